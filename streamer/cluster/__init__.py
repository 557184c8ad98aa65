"""`sparrow-stream cluster`: replicas of the standalone server on Ray Serve (app.py) behind one gRPC front
(front.py) that places streams by load and ends a stream whose replica died UNAVAILABLE for the client to
resume (StreamConfig.resume)."""
