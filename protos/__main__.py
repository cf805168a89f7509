"""`python -m protos`: generate the gRPC stubs from the .proto files (after editing one)."""

from protos import generate

for path in generate(force=True):
    print(path)
