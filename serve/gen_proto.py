"""Regenerate aigc_ray/serving/proto/aigc_pb2*.py from serve/aigc.proto (run from the repo root):

    python serve/gen_proto.py

Needs grpcio-tools (in the [dev] extra). The generated files are committed.
"""

import sys
from pathlib import Path

from grpc_tools import protoc

root = Path(__file__).resolve().parent.parent
args = ["protoc", f"-Iaigc_ray/serving/proto={root / 'serve'}", f"--python_out={root}", f"--grpc_python_out={root}",
        str(root / "serve" / "aigc.proto")]
sys.exit(protoc.main(args))
