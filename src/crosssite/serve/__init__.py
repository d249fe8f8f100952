"""`crosssite serve`: a trained model as an HTTP service (FastAPI + uvicorn) with a browser viewer.

    pip install 'crosssite[serve]'
    crosssite serve runs/x/model --token "$TOKEN"          # http://127.0.0.1:8000/ (viewer), /docs (API)

`crosssite.serve.service` holds the model and scores uploads (no web framework needed, used by the tests and
the benchmark directly); `crosssite.serve.app` is the FastAPI application around it; `crosssite.serve.batching`
merges concurrent requests' slices into one forward pass; `crosssite.serve.uploads` keeps uploads in a
private temporary folder and refuses zip bombs. The viewer is ``static/`` (HTML, JS, CSS; no build step).
"""

from crosssite.serve.batching import BatchedBackend, MicroBatcher
from crosssite.serve.service import NOTICE, Limits, Service, ServiceError, Upload

__all__ = ["NOTICE", "BatchedBackend", "Limits", "MicroBatcher", "Service", "ServiceError", "Upload"]
