#!/usr/bin/env sh
# Installs Orthanc and its DICOMweb plugin (Debian/Ubuntu packages) for the PACS tests,
# only when Orthanc is missing and we are root; otherwise it does nothing. The tests
# fail with a one-line message saying how to install them when they are still missing.
set -eu
if command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; then
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: Orthanc is not installed and cannot be installed here (needs root and apt-get);" \
         "the PACS tests will fail: sudo apt-get install -y orthanc orthanc-dicomweb" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null; }; then
    # the other tests still run; the PACS tests fail, saying how to install Orthanc
    echo "note: apt-get could not install orthanc orthanc-dicomweb; the PACS tests will fail" >&2
fi
# the package starts a system Orthanc on 4242/8042 where a service manager runs; the tests
# start their own on free ports and do not need it
