"""The Open Inference Protocol (KServe v2): the wire format as pure functions, and the steps of one request.

An infer request is a JSON header, optionally followed by binary tensor data (Triton's binary tensor data
extension): when the `Inference-Header-Content-Length` header is present, the first that many bytes of the
body are the JSON and the rest holds, in input order, the raw bytes of every input whose parameters carry
`binary_data_size`. Responses are encoded the same way for the outputs asked for with `binary_data`.

Path of one request (`service.routes.v2.model_infer` calls them in order):
1. `decode.parse_infer_request` splits the body, reads the JSON and turns every input into a numpy array
   (numeric types) or a list of bytes (BYTES), checking element counts against the declared shape.
2. `flow.model_inputs` checks the tensors against the model's `documents.Signature` (`tensors.check_input`)
   and prepares the images; `service.dispatch.infer` runs them through the classify batcher.
3. `flow.output_tensor` builds each output asked for; `encode.encode_infer_response` writes them back,
   as JSON values or as binary data, in request order.
Every problem with the request raises `errors.ProtocolError`, whose message names the field and what is accepted.

Modules: `errors`, `tensors` (datatypes, `Tensor`, BYTES framing), `decode` (requests), `encode` (responses),
`documents` (the model's tensors, metadata and config) are pure: no HTTP framework, no model. `flow` (the
request's inputs and outputs against the served model) and `stats` (Triton's statistics from Prometheus)
join them to the service. This package re-exports the pure part; import `flow` and `stats` by name.
"""

from export.artifacts import LOGITS, TOKENS

from .decode import InferRequest, RequestedOutput, inflate, parse_infer_request, split_body
from .documents import (
    CAM,
    EXTENSIONS,
    IMAGE_BYTES,
    IMAGES,
    INPUT_RULE,
    OUTPUT_RULE,
    Signature,
    TensorSpec,
    model_config,
    model_metadata,
    signature,
)
from .encode import classification_strings, encode_infer_response
from .errors import ProtocolError, error_body
from .tensors import DATATYPES, HEADER_LENGTH, NUMPY_TYPES, Tensor, check_input, pack_bytes, unpack_bytes

__all__ = [
    "CAM",
    "DATATYPES",
    "EXTENSIONS",
    "HEADER_LENGTH",
    "IMAGES",
    "IMAGE_BYTES",
    "INPUT_RULE",
    "LOGITS",
    "NUMPY_TYPES",
    "OUTPUT_RULE",
    "TOKENS",
    "InferRequest",
    "ProtocolError",
    "RequestedOutput",
    "Signature",
    "Tensor",
    "TensorSpec",
    "check_input",
    "classification_strings",
    "encode_infer_response",
    "error_body",
    "inflate",
    "model_config",
    "model_metadata",
    "pack_bytes",
    "parse_infer_request",
    "signature",
    "split_body",
    "unpack_bytes",
]
