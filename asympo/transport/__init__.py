"""How data and weights move between processes: Redis streams (leases, dead letters, the
exactly-once commit), the Redis connection and ACL table, HTTP/gRPC hardening, the
versioned weight store, its client, and the direct weight broadcast."""
