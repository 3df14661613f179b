using DmaBroker.Core;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using Xunit.Abstractions;

namespace DmaBroker.Cluster.Tests;

/// <summary>A broker replica in the test process: a <see cref="Broker"/> on an <see cref="EtcdOwnershipStore"/>.</summary>
public sealed class Replica : IAsyncDisposable
{
    private Replica(Broker broker, EtcdOwnershipStore store)
    {
        Broker = broker;
        Store = store;
    }

    public Broker Broker { get; }
    public EtcdOwnershipStore Store { get; }

    /// <summary>
    /// Starts replica <paramref name="name"/> on <paramref name="endpoints"/>. Its sessions' own
    /// leases (clients' silence) are long: in-process sessions send nothing, and the etcd lease
    /// (<paramref name="ttl"/>, 3 s by default) is what these tests are about.
    /// </summary>
    public static async Task<Replica> StartAsync(string name, IReadOnlyList<Uri> endpoints, TimeProvider? time = null, TimeSpan? ttl = null,
        ITestOutputHelper? output = null)
    {
        var store = await EtcdOwnershipStore.ConnectAsync(new EtcdStoreOptions
        {
            Endpoints = endpoints,
            Replica = name,
            LeaseTtl = ttl ?? TimeSpan.FromSeconds(3),
        }, time, output is null ? null : new TestLog(output, name)).WaitAsync(TimeSpan.FromSeconds(30));
        var broker = new Broker(TopologyDocument.Default(), new BrokerOptions
        {
            Store = store,
            Sessions = new SessionOptions { LeaseTtl = TimeSpan.FromHours(1) },
            // Room for every change of a contention run, so a watch is never resynchronised.
            WatchBuffer = 1 << 16,
        }, time);
        await store.StartAsync(broker).WaitAsync(TimeSpan.FromSeconds(30));
        return new Replica(broker, store);
    }

    public async ValueTask DisposeAsync()
    {
        await Broker.DisposeAsync();
        await Store.DisposeAsync();
    }
}
