#!/usr/bin/env sh
# Installs what the PACS tests need from Debian/Ubuntu packages, only what is missing and
# only as root: Orthanc and its DICOMweb plugin (the real archive the tests start), and
# dicom3tools (dciodvfy checks the DICOM objects push writes). Otherwise it does nothing;
# the tests fail with a one-line message saying how to install what is still missing.
set -eu
packages=""
if ! command -v Orthanc >/dev/null 2>&1 && [ ! -x /usr/sbin/Orthanc ]; then
    packages="orthanc orthanc-dicomweb"
fi
if ! command -v dciodvfy >/dev/null 2>&1; then
    packages="$packages dicom3tools"
fi
if [ -z "$packages" ]; then
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: $packages not installed and cannot be installed here (needs root and apt-get);" \
         "the PACS tests will fail: sudo apt-get install -y $packages" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086 # the list is meant to split
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends $packages >/dev/null; }; then
    # the other tests still run; the PACS tests fail, saying how to install what is missing
    echo "note: apt-get could not install $packages; the PACS tests will fail" >&2
fi
# the orthanc package starts a system Orthanc on 4242/8042 where a service manager runs; the
# tests start their own on free ports and do not need it
