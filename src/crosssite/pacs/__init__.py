"""Into the hospital's PACS: a DICOM node (C-STORE in), selection rules, the result as a DICOM Comprehensive SR,
delivery with retries (C-STORE, STOW-RS, or a folder), and the DICOMweb path (QIDO-RS / WADO-RS in, STOW-RS out).

    rules.py     which instances are scored, and how a series splits into volumes
    sr.py        the Comprehensive SR of one scored volume (highdicom), and reading it back
    capture.py   the Grad-CAM overlays of a volume's top slices as a Secondary Capture series (optional)
    delivery.py  senders and the outbox on disk that retries with back-off
    pipeline.py  received instance -> spool -> `Predictor` -> SR -> outbox, with a health line per series
    node.py      the pynetdicom C-STORE SCP and its series-complete timer
    dicomweb.py  a study pulled from a DICOMweb server, scored, its reports stored back
    orthanc.py   Orthanc's configuration that routes CT to the node, and a local Orthanc process
    series.py    a CT series written from 2D slices (for demonstrations, tests and benchmarks)

pynetdicom, highdicom and dicomweb-client come with ``pip install 'crosssite[pacs]'`` and are imported only
when a function here needs them, so ``crosssite --help`` and the rest of the package never load them.
"""
