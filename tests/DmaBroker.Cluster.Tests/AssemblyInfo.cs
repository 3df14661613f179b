// Each test starts its own etcd and measures lease expiry: run them one at a time.
[assembly: CollectionBehavior(DisableTestParallelization = true)]
