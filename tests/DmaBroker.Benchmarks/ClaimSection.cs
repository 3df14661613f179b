using System.Diagnostics;
using System.Text.Json;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Benchmarks;

/// <summary>
/// Claim and release through the broker: one cycle is SetContainer (the group claim of SPEC §3, the
/// container's domain attached) then UnsetContainer (released), two unary calls on a session whose
/// container already exists. 1 and 8 callers, each with its own session, connection and edu group
/// (a topology of 8 edu devices behind their own root ports), cycling back to back; beside each, as
/// many callers making the same two calls on a raw gRPC service that answers at once
/// (<see cref="RawVfioService"/>).
/// </summary>
internal sealed class ClaimSection : IBenchSection
{
    private const int MaxCallers = 8;

    public string Key => "claim";

    public async Task<IReadOnlyList<BenchRow>> RunAsync(BenchOptions options)
    {
        var topology = Path.Combine(Directory.CreateTempSubdirectory("dmabroker-claim-bench-").FullName, "topology.json");
        try
        {
            await File.WriteAllTextAsync(topology, Topology());
            await using var broker = await Host.StartBrokerAsync("http://127.0.0.1:0", "--topology", topology);
            await using var raw = await Host.StartRawAsync();
            var callers = new List<Caller>();
            try
            {
                for (var i = 0; i < MaxCallers; i++)
                    callers.Add(await Caller.OpenAsync(broker.Address, raw.Address, $"0000:{i + 1:x2}:00.0"));
                var rows = new List<BenchRow>();
                foreach (var count in new[] { 1, MaxCallers })
                {
                    var rates = await Rounds.AlternateAsync(options, options.Quick ? 0 : 1,
                        () => CyclesAsync(callers.Take(count), raw: false, options.Seconds),
                        () => CyclesAsync(callers.Take(count), raw: true, options.Seconds));
                    rows.Add(Rounds.Row($"claim+release cycles/s, {count} caller{(count == 1 ? "" : "s")}", rates[0],
                        "raw unary calls", rates[1], r => Rounds.Format(r, 0, "cycles/s"), note: " (a cycle: SetContainer + UnsetContainer)"));
                }
                return rows;
            }
            finally
            {
                foreach (var caller in callers)
                    await caller.DisposeAsync();
            }
        }
        finally
        {
            Directory.Delete(Path.GetDirectoryName(topology)!, recursive: true);
        }
    }

    /// <summary>Every caller cycles until <paramref name="seconds"/> are up: cycles per second, all callers together.</summary>
    private static async Task<double> CyclesAsync(IEnumerable<Caller> callers, bool raw, double seconds)
    {
        var deadline = TimeSpan.FromSeconds(seconds);
        var clock = Stopwatch.StartNew();
        var cycles = await Task.WhenAll(callers.Select(c => Task.Run(async () =>
        {
            var vfio = raw ? c.RawVfio : c.Session.Raw.Vfio;
            long done = 0;
            while (clock.Elapsed < deadline)
            {
                await vfio.SetContainerAsync(new SetContainerRequest { GroupId = c.Group, ContainerId = c.Container });
                await vfio.UnsetContainerAsync(new UnsetContainerRequest { GroupId = c.Group });
                done++;
            }
            return done;
        })));
        return cycles.Sum() / clock.Elapsed.TotalSeconds;
    }

    /// <summary>A host bridge and <see cref="MaxCallers"/> root ports, each with an edu device bound to vfio-pci: a group each.</summary>
    private static string Topology() => JsonSerializer.Serialize(new
    {
        devices = new object[] { new { address = "0000:00:00.0", kind = "host-bridge", vendorId = "8086", deviceId = "29c0", classCode = "060000", model = "bridge" } }
            .Concat(Enumerable.Range(1, MaxCallers).SelectMany(i => new object[]
            {
                new { address = $"0000:00:{i:x2}.0", kind = "root-port", acs = true, secondaryBus = $"{i:x2}", vendorId = "8086", deviceId = "7c90", classCode = "060400", model = "bridge", driver = "pcieport" },
                new { address = $"0000:{i:x2}:00.0", kind = "endpoint", acs = true, vendorId = "1234", deviceId = "11e8", classCode = "00ff00", model = "edu", driver = "vfio-pci" },
            })),
    });

    /// <summary>One caller: a session on its own connection with a container and a free group, and its own connection to the raw service.</summary>
    private sealed class Caller(BrokerClient client, BrokerSession session, BrokerClient rawClient, uint group, ulong container) : IAsyncDisposable
    {
        public BrokerSession Session => session;
        public Vfio.VfioClient RawVfio { get; } = new(rawClient.Raw.Channel);
        public uint Group => group;
        public ulong Container => container;

        public static async Task<Caller> OpenAsync(string brokerAddress, string rawAddress, string edu)
        {
            var client = BrokerClient.Connect(brokerAddress);
            var rawClient = BrokerClient.Connect(rawAddress);
            try
            {
                var group = (await client.ListDevicesAsync()).Devices.Single(d => d.Address == edu).GroupId;
                var session = await client.OpenSessionAsync("bench-claim");
                return new Caller(client, session, rawClient, group, await session.CreateContainerAsync(ContainerType.Type1V2));
            }
            catch
            {
                client.Dispose();
                rawClient.Dispose();
                throw;
            }
        }

        public async ValueTask DisposeAsync()
        {
            await session.DisposeAsync();
            client.Dispose();
            rawClient.Dispose();
        }
    }
}
