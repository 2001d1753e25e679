//! The shard plugin ABI (filled in by the capability-shards work).
