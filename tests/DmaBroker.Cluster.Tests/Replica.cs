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
    /// (<paramref name="ttl"/>, 3 s by default) is what these tests are about. A test whose premise
    /// is that etcd answers a held or cut-off call eventually (commits it before the client gives
    /// up) passes a long <paramref name="callTimeout"/> (the store's 2 s by default), so that a
    /// loaded machine delaying etcd by a second or two does not break the premise.
    /// </summary>
    public static async Task<Replica> StartAsync(string name, IReadOnlyList<Uri> endpoints, TimeProvider? time = null, TimeSpan? ttl = null,
        ITestOutputHelper? output = null, TimeSpan? callTimeout = null)
    {
        var options = new EtcdStoreOptions
        {
            Endpoints = endpoints,
            Replica = name,
            LeaseTtl = ttl ?? TimeSpan.FromSeconds(3),
        };
        if (callTimeout is { } timeout)
            options = options with { CallTimeout = timeout };
        var store = await EtcdOwnershipStore.ConnectAsync(options, time, output is null ? null : new TestLog(output, name)).WaitAsync(TimeSpan.FromSeconds(30));
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
