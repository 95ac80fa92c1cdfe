"""Generated protobuf and gRPC code for the gridllm.v1 API (see protos/; run `make protos`)."""
