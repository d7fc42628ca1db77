"""PACS in, results back: pull studies from an archive, push DICOM SR results to it.

- :mod:`.connection`  where the archive is and how to log in (credentials from the
  environment or a 0600 config file, never the command line; TLS verified by default);
- :mod:`.client`      the two protocols behind one small interface: DICOMweb
  (``dicomweb-client``: QIDO-RS, WADO-RS, STOW-RS) and DIMSE (``pynetdicom``: C-FIND,
  C-GET, C-STORE);
- :mod:`.ledger`      what was fetched and delivered (SQLite beside the output), so a
  nightly job fetches only what is new and a killed run never fetches twice;
- :mod:`.pull`        query by date, modality and body part, retrieve into a folder
  that ``predict`` reads unchanged;
- :mod:`.sr`          one TID 1500 Comprehensive SR per study and model (``highdicom``)
  with deterministic UIDs;
- :mod:`.push`        build, send, verify, record; bounded retries.

Nothing here imports torch.
"""
