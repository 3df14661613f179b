using System.Diagnostics;
using System.Globalization;
using DmaBroker.Cluster;
using DmaBroker.Cluster.Tests;
using DmaBroker.Core;
using DmaBroker.Core.Ownership;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Benchmarks;

/// <summary>
/// What sharing the group table on etcd costs a claim (SPEC §16): claims per second (a
/// SetContainer and its UnsetContainer) on one broker with the embedded table, one replica on
/// etcd, and three replicas on the same etcd, in alternating rounds of one run. Four sessions
/// claim four different groups (the edu devices) at once, so the rows measure the store, not
/// contention; etcd is a 3-member cluster on this machine, as deploy/cluster.sh runs it.
/// </summary>
internal sealed class ClusterBenchmark : IBenchSection
{
    private const int Workers = 4;

    public string Key => "cluster";

    public async Task<IReadOnlyList<BenchRow>> RunAsync(BenchOptions options)
    {
        await using var etcd = await EtcdCluster.StartAsync(size: 3);
        await using var embedded = new Broker(TopologyDocument.Default(), Options(null));
        var one = await StartReplicasAsync(etcd, "one", 1);
        var three = await StartReplicasAsync(etcd, "three", 3);
        try
        {
            var setups = new (string Name, Broker[] Brokers)[]
            {
                ("1 replica, embedded table", [embedded]),
                ("1 replica on etcd", [.. one.Select(r => r.Broker)]),
                ("3 replicas on etcd", [.. three.Select(r => r.Broker)]),
            };
            var rates = setups.Select(_ => new List<double>()).ToArray();
            var seconds = TimeSpan.FromSeconds(options.Seconds);
            for (var round = 0; round < options.Rounds; round++)
            {
                for (var s = 0; s < setups.Length; s++)
                    rates[s].Add(await MeasureAsync(setups[s].Brokers, seconds));
            }
            var baseline = Rounds.Median(rates[0]);
            return [.. setups.Select((setup, s) =>
            {
                var median = Rounds.Median(rates[s]);
                return new BenchRow($"claim+release, {setup.Name}", $"{median:F0} claims/s",
                    s == 0 ? "—" : $"embedded {baseline:F0} claims/s",
                    s == 0 ? "" : string.Create(CultureInfo.InvariantCulture, $"{median / baseline * 100:G3} %"),
                    $"{options.Rounds} rounds x {options.Seconds:F1} s, {Workers} sessions on {setup.Brokers.Length} broker(s), one group each; rounds: {string.Join(" ", rates[s].Select(r => r.ToString("F0", CultureInfo.InvariantCulture)))}");
            })];
        }
        finally
        {
            foreach (var r in one.Concat(three))
            {
                await r.Broker.DisposeAsync();
                await r.Store.DisposeAsync();
            }
        }
    }

    private static BrokerOptions Options(IOwnershipStore? store) => new()
    {
        Store = store,
        Sessions = new SessionOptions { LeaseTtl = TimeSpan.FromHours(1) },
    };

    private static async Task<List<(Broker Broker, EtcdOwnershipStore Store)>> StartReplicasAsync(EtcdCluster etcd, string prefix, int count)
    {
        var replicas = new List<(Broker, EtcdOwnershipStore)>();
        for (var i = 0; i < count; i++)
        {
            var store = await EtcdOwnershipStore.ConnectAsync(new EtcdStoreOptions { Endpoints = etcd.Endpoints, Replica = $"{prefix}{i}" });
            var broker = new Broker(TopologyDocument.Default(), Options(store));
            await store.StartAsync(broker);
            replicas.Add((broker, store));
        }
        return replicas;
    }

    // Claims per second over `duration`, Workers sessions at once (spread over the brokers), each
    // on its own thread (a claim on etcd blocks under its group's lock) and its own group.
    private static async Task<double> MeasureAsync(Broker[] brokers, TimeSpan duration)
    {
        var groups = brokers[0].Journal.Current.Groups.Values
            .Where(g => g.OwnerKind == OwnerKind.None && g.Devices.Length == 1).Select(g => g.Id).Take(Workers).ToArray();
        var sessions = groups.Select((_, w) => brokers[w % brokers.Length].Sessions.Open("bench")).ToArray();
        var containers = sessions.Select((s, w) => brokers[w % brokers.Length].Vfio.CreateContainer(s, ContainerType.Type1v2)).ToArray();
        long claims = 0;
        var clock = Stopwatch.StartNew();
        await Task.WhenAll(groups.Select((group, w) => Task.Factory.StartNew(() =>
        {
            var vfio = brokers[w % brokers.Length].Vfio;
            long mine = 0;
            while (clock.Elapsed < duration)
            {
                vfio.SetContainer(sessions[w], group, containers[w].Id);
                vfio.UnsetContainer(sessions[w], group);
                mine++;
            }
            Interlocked.Add(ref claims, mine);
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default)));
        var rate = claims / clock.Elapsed.TotalSeconds;
        await Task.WhenAll(sessions.Select((s, w) => brokers[w % brokers.Length].Sessions.EndAsync(s, SessionEndReason.ClientClosed)));
        return rate;
    }
}
