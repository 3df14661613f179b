using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Threading.Channels;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Benchmarks;

/// <summary>
/// Release after SIGKILL of a client process, as a Topology.Watch watcher sees it. Two real broker
/// processes run side by side: one idle, and one with 1,000 other sessions live and pinging (from a
/// load process, over several connections). Rounds alternate between them and between two kinds of
/// client process, each of which claims a group and, once the watcher has seen the claim, is
/// SIGKILLed: a .NET client on the client library (<see cref="BenchChild"/> <c>hold</c>), and a lean
/// one (<c>lean_client.py</c>: Python's standard library, raw HTTP/2), which the kernel tears down
/// in a third of the time. The time runs from just before kill(2) to the watcher receiving the
/// release, both read from this process's monotonic clock. The brokers' leases are their default,
/// 3 s: only noticing the dead connection can release the group in time.
/// </summary>
internal sealed class SigkillBenchmark : IBenchSection
{
    private const uint Group = 14;
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);

    public string Key => "sigkill";

    public async Task<IReadOnlyList<BenchRow>> RunAsync(BenchOptions options)
    {
        var kills = options.Quick ? 10 : 100;
        var load = options.Quick ? 200 : 1000;
        await using var idle = await BrokerProcess.StartAsync();
        await using var busy = await BrokerProcess.StartAsync();
        await using var loader = ChildProcess.StartChild("load", busy.Address, load.ToString(CultureInfo.InvariantCulture), "4");
        var opened = await loader.WaitForLineAsync("opened ", Timeout);
        await using var idleWatch = await GroupWatch.StartAsync(idle.Client);
        await using var busyWatch = await GroupWatch.StartAsync(busy.Client);

        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        var port = ((IPEndPoint)listener.LocalEndpoint).Port;

        var sides = new[]
        {
            new Side(idle, idleWatch, Holder.DotNet), new Side(busy, busyWatch, Holder.DotNet),
            new Side(idle, idleWatch, Holder.Lean), new Side(busy, busyWatch, Holder.Lean),
        };
        // One warm-up kill each, not counted: the broker's first release JIT-compiles its path.
        for (var round = -1; round < kills; round++)
        {
            for (var i = 0; i < sides.Length; i++)
            {
                var side = sides[(round + 1 + i) % sides.Length];
                var (release, eof) = await KillOnceAsync(side, listener, port);
                if (round < 0)
                    continue;
                side.Release.Add(release);
                side.Eof.Add(eof);
            }
        }
        var stats = await busy.Client.Admin.GetStatsAsync();
        if (stats.Sessions != load)
            throw new InvalidOperationException($"the loaded broker has {stats.Sessions} sessions at the end, not {load}: some were lost");
        var common = $"{kills} kills per side, the four sides (two brokers, two clients) alternating{Rounds.LoadAverage()}";
        var loaded = $"{common}; {load} sessions {opened.Trim()} over 4 connections";
        return
        [
            Row("release after SIGKILL of a .NET client, idle broker", sides[0], common),
            Row($"release after SIGKILL of a .NET client, {load} other sessions pinging", sides[1], loaded),
            Row("release after SIGKILL of a lean client, idle broker", sides[2], common),
            Row($"release after SIGKILL of a lean client, {load} other sessions pinging", sides[3], loaded),
        ];
    }

    /// <summary>The client process that holds the group and is killed.</summary>
    private enum Holder
    {
        /// <summary>This program's <c>hold</c> mode: the client library, ~47 MB resident, 13 threads.</summary>
        DotNet,

        /// <summary><c>lean_client.py</c>: the same session and claim from Python's standard library, ~10 MB, one thread.</summary>
        Lean,
    }

    private sealed record Side(BrokerProcess Broker, GroupWatch Watch, Holder Holder)
    {
        public List<double> Release { get; } = [];

        public List<double> Eof { get; } = [];
    }

    // Baseline: the same kill seen by a plain TCP socket the holder had open to this process, i.e.
    // what the kernel and this process's wake-up take before any broker could notice anything.
    // The ratio column is the broker's own share, kill by kill: release minus that EOF.
    private static BenchRow Row(string name, Side side, string detail)
    {
        var (r50, r99) = Percentiles(side.Release);
        var (e50, e99) = Percentiles(side.Eof);
        var share = side.Release.Zip(side.Eof, (r, e) => r - e).ToList();
        var (s50, s99) = Percentiles(share);
        return new BenchRow(name, $"p50 {r50:F1} / p99 {r99:F1} ms", $"holder's TCP socket EOF p50 {e50:F1} / p99 {e99:F1} ms",
            $"broker's share p50 {s50:F1} / p99 {s99:F1} ms",
            $"{detail}; release: {Describe(side.Release)}; broker's share (release minus EOF), each kill: {Describe(share)}");
    }

    private static async Task<(double Release, double Eof)> KillOnceAsync(Side side, TcpListener listener, int port)
    {
        string[] args = [side.Broker.Address, Group.ToString(CultureInfo.InvariantCulture), port.ToString(CultureInfo.InvariantCulture)];
        await using var holder = side.Holder == Holder.DotNet
            ? ChildProcess.StartChild(["hold", .. args])
            : ChildProcess.StartProgram("python3", [Path.Combine(AppContext.BaseDirectory, "lean_client.py"), "hold", .. args]);
        var held = await holder.WaitForLineAsync("holding ", Timeout);
        var session = ulong.Parse(held.Split(' ')[2], CultureInfo.InvariantCulture);
        using var socket = await listener.AcceptSocketAsync().WaitAsync(Timeout);
        await side.Watch.WaitForAsync(g => g.OwnerKind == OwnerKind.User && g.OwnerSession == session);
        // A thread of its own blocks reading the socket, so the EOF is stamped the moment it comes.
        var eof = new TaskCompletionSource<long>(TaskCreationOptions.RunContinuationsAsynchronously);
        var reader = new Thread(() =>
        {
            try
            {
                while (socket.Receive(new byte[1]) > 0)
                {
                }
            }
            catch (SocketException)
            {
                // A reset: the end all the same.
            }
            eof.TrySetResult(Stopwatch.GetTimestamp());
        }) { IsBackground = true, Name = "eof" };
        reader.Start();
        var killedAt = Stopwatch.GetTimestamp();
        holder.Kill();
        var releasedAt = await side.Watch.WaitForAsync(g => g.OwnerKind == OwnerKind.None);
        var closedAt = await eof.Task.WaitAsync(Timeout);
        return (Stopwatch.GetElapsedTime(killedAt, releasedAt).TotalMilliseconds, Stopwatch.GetElapsedTime(killedAt, closedAt).TotalMilliseconds);
    }

    private static (double P50, double P99) Percentiles(List<double> values)
    {
        var sorted = values.Order().ToList();
        return (sorted[(sorted.Count - 1) / 2], sorted[(int)Math.Ceiling(0.99 * sorted.Count) - 1]);
    }

    private static string Describe(List<double> values) =>
        string.Join(", ", values.Order().Select(v => v.ToString("F1", CultureInfo.InvariantCulture))) + " ms";

    /// <summary>Group <see cref="Group"/>'s changes as a watcher receives them, each stamped with its arrival on this process's clock.</summary>
    internal sealed class GroupWatch : IAsyncDisposable
    {
        private readonly CancellationTokenSource _stop = new();
        private readonly Channel<(long At, Group Group)> _changes = Channel.CreateUnbounded<(long, Group)>();
        private readonly Task _pump;

        private GroupWatch(BrokerClient client) => _pump = PumpAsync(client);

        public static async Task<GroupWatch> StartAsync(BrokerClient client)
        {
            var watch = new GroupWatch(client);
            await watch.WaitForAsync(g => g.OwnerKind == OwnerKind.None);
            return watch;
        }

        /// <summary>Waits for a change (or the snapshot) of the group that satisfies <paramref name="condition"/>; returns its arrival timestamp.</summary>
        public async Task<long> WaitForAsync(Func<Group, bool> condition)
        {
            using var cts = new CancellationTokenSource(Timeout);
            while (true)
            {
                var (at, group) = await _changes.Reader.ReadAsync(cts.Token);
                if (condition(group))
                    return at;
            }
        }

        private async Task PumpAsync(BrokerClient client)
        {
            try
            {
                await foreach (var ev in client.WatchAsync(_stop.Token))
                {
                    var at = Stopwatch.GetTimestamp();
                    if (ev.Group is { Id: Group } group)
                        _changes.Writer.TryWrite((at, group));
                    else if (ev.Snapshot is { } snapshot && snapshot.Groups.FirstOrDefault(g => g.Id == Group) is { } current)
                        _changes.Writer.TryWrite((at, current));
                }
            }
            catch (Exception e) when (e is OperationCanceledException or Grpc.Core.RpcException && _stop.IsCancellationRequested)
            {
                // Disposed.
            }
            finally
            {
                _changes.Writer.TryComplete();
            }
        }

        public async ValueTask DisposeAsync()
        {
            await _stop.CancelAsync();
            await _pump;
            _stop.Dispose();
        }
    }
}
