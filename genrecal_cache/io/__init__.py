"""I/O under the cache format: durable local writes, retrying remote filesystems, mirrors, fast local reads."""
