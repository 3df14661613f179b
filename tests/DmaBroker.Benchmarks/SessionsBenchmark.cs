using System.Diagnostics;
using System.Globalization;

namespace DmaBroker.Benchmarks;

/// <summary>
/// 10,000 concurrent sessions on one real broker process, opened by a load process
/// (<see cref="BenchChild"/> <c>load</c>) over several connections, every session pinging at a
/// third of the default 3 s lease. Reports the broker's memory per session, from its resident set
/// (/proc/&lt;pid&gt;/status VmRSS) and its managed heap (the runtime's own meter on /metrics),
/// each read after a full collection, with the sessions open minus with none (after a warm-up
/// batch has come and gone); checks that none is lost to its lease over more than two lease
/// periods; and times opening them all, closing them all, and losing them all at once when the
/// load process is SIGKILLed (until the broker counts none).
/// </summary>
internal sealed class SessionsBenchmark : IBenchSection
{
    private const int Connections = 10;
    private static readonly TimeSpan LeaseTtl = TimeSpan.FromSeconds(3);
    private static readonly TimeSpan Timeout = TimeSpan.FromMinutes(3);

    public string Key => "sessions";

    public async Task<IReadOnlyList<BenchRow>> RunAsync(BenchOptions options)
    {
        var count = options.Quick ? 2000 : 10_000;
        var n = count.ToString(CultureInfo.InvariantCulture);
        await using var broker = await BrokerProcess.StartAsync();

        // Warm-up: the broker's session path compiled, its pools grown once.
        await using (var warm = ChildProcess.StartChild("load", broker.Address, "1000", Connections.ToString(CultureInfo.InvariantCulture)))
        {
            await warm.WaitForLineAsync("opened ", Timeout);
            await warm.SendAsync("close");
            await warm.WaitForLineAsync("closed ", Timeout);
        }
        await broker.WaitForSessionsAsync(0, Timeout);
        await broker.Process.CollectGarbageAsync();
        var rss0 = broker.Process.ResidentBytes();
        var heap0 = await broker.ManagedHeapAfterLastGcAsync();

        // Open them all, then hold them over more than two lease periods while they ping.
        var closedBefore = (await broker.Client.Admin.GetStatsAsync()).SessionsClosed;
        double openMs, closeMs, lossMs;
        long rssN, heapN;
        await using (var load = ChildProcess.StartChild("load", broker.Address, n, Connections.ToString(CultureInfo.InvariantCulture)))
        {
            var clock = Stopwatch.StartNew();
            await load.WaitForLineAsync("opened ", Timeout);
            await broker.WaitForSessionsAsync((uint)count, Timeout);
            openMs = clock.Elapsed.TotalMilliseconds;
            var held = Stopwatch.StartNew();
            while (held.Elapsed < 2.5 * LeaseTtl)
            {
                await Task.Delay(LeaseTtl / 2);
                await CheckNoneLostAsync(broker, load, count, closedBefore);
            }
            await broker.Process.CollectGarbageAsync();
            rssN = broker.Process.ResidentBytes();
            heapN = await broker.ManagedHeapAfterLastGcAsync();
            await CheckNoneLostAsync(broker, load, count, closedBefore);

            clock.Restart();
            await load.SendAsync("close");
            await broker.WaitForSessionsAsync(0, Timeout);
            closeMs = clock.Elapsed.TotalMilliseconds;
        }

        // Again, and then every connection is lost at once.
        await using (var load = ChildProcess.StartChild("load", broker.Address, n, Connections.ToString(CultureInfo.InvariantCulture)))
        {
            await load.WaitForLineAsync("opened ", Timeout);
            await broker.WaitForSessionsAsync((uint)count, Timeout);
            var clock = Stopwatch.StartNew();
            load.Kill();
            await broker.WaitForSessionsAsync(0, Timeout);
            lossMs = clock.Elapsed.TotalMilliseconds;
        }

        var rssPer = (rssN - rss0) / (double)count;
        var heapPer = (heapN - heap0) / (double)count;
        var detail = $"{count} sessions over {Connections} connections, held {2.5 * LeaseTtl.TotalSeconds:F1} s (lease {LeaseTtl.TotalSeconds:F0} s) with none lost{Rounds.LoadAverage()}";
        return
        [
            new BenchRow($"{count} sessions: broker memory per session", $"RSS {rssPer / 1024:F1} KiB, managed heap {heapPer / 1024:F1} KiB",
                Detail: $"{detail}; RSS {rss0 / 1048576.0:F1} -> {rssN / 1048576.0:F1} MiB, heap {heap0 / 1048576.0:F1} -> {heapN / 1048576.0:F1} MiB, after a full GC"),
            new BenchRow($"{count} sessions: open all, close all, lose all", $"{openMs / 1000:F2} s / {closeMs / 1000:F2} s / {lossMs / 1000:F2} s",
                Detail: $"{detail}; open: until the broker counts them all; close: every client closes its stream; lose: the client process is SIGKILLed; until the broker counts none"),
        ];
    }

    private static async Task CheckNoneLostAsync(BrokerProcess broker, ChildProcess load, int count, ulong closedBefore)
    {
        var stats = await broker.Client.Admin.GetStatsAsync();
        await load.SendAsync("check");
        var live = int.Parse(await load.WaitForLineAsync("live ", Timeout), CultureInfo.InvariantCulture);
        if (stats.Sessions != count || stats.SessionsClosed != closedBefore || live != count)
            throw new InvalidOperationException($"sessions lost while pinging: the broker has {stats.Sessions} of {count} ({stats.SessionsClosed - closedBefore} ended), the client {live}; ended by reason: {await broker.EndReasonsAsync()}");
    }
}
