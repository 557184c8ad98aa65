"""The gRPC front of sparrow.v1.Captioner: guarded request decoding (wire.py), the RPCs (servicer.py), and
results rendered as protobuf (responses.py).

Named `grpc_front`, not `grpc`: run as a script from inside streamer/ (`python streamer/cli.py`), Python
puts streamer/ first on sys.path, and a `streamer/grpc/` package would then be what every `import grpc`
found, the grpc library hidden behind it. With `-m` or an installed entry point it would not clash, but a
name that cannot clash costs nothing.
"""
