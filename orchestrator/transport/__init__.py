"""The gRPC client of the remote proxy: the only place outside emulator/ that imports grpc."""
