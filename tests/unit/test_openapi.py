"""docs/openapi.json is the daemon's real OpenAPI document."""
import json
from pathlib import Path

from sealvm.host.api import openapi_document

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_the_published_openapi_document_is_current():
    assert json.loads(DOC.read_text()) == json.loads(json.dumps(openapi_document())), \
        "regenerate with: sealvm hostd --print-openapi > docs/openapi.json"


def test_every_lifecycle_route_is_documented():
    paths = openapi_document()["paths"]
    for route in ("/v1/vms", "/v1/vms/{vm_id}", "/v1/vms/{vm_id}/start", "/v1/vms/{vm_id}/pause",
                  "/v1/vms/{vm_id}/resume", "/v1/vms/{vm_id}/stop", "/v1/vms/{vm_id}/console",
                  "/v1/vms/{vm_id}/logs"):
        assert route in paths, route
