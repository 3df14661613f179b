using System.Diagnostics;
using DmaBroker.Protocol.V1;
using Xunit.Abstractions;

namespace DmaBroker.Integration.Tests;

/// <summary>
/// Real client processes holding groups, killed or frozen: the broker must notice and release
/// everything, and a watcher must see it.
/// </summary>
public sealed class ProcessDeathTests(ITestOutputHelper output)
{
    private static readonly TimeSpan StartupTimeout = TimeSpan.FromSeconds(30);

    [Fact]
    public async Task SigKill_ClientHoldingGroup_WatcherSeesReleaseBeforeLeaseCouldExpire()
    {
        // A lease far longer than the test: only noticing the dead connection can release the group.
        await using var broker = await LiveBroker.StartAsync("--lease-ttl-ms", "60000");
        await using var watch = await GroupWatch.StartAsync(broker.Client);
        var latencies = new List<double>();
        for (var round = 0; round < 3; round++)
        {
            var group = (uint)(14 + round);
            await using var holder = ClientProcess.StartDmactl(broker.Address, "hold", group.ToString(System.Globalization.CultureInfo.InvariantCulture));
            await holder.WaitForLineAsync($"holding group {group}", StartupTimeout);
            var held = await watch.WaitForAsync(group, OwnerKind.User);

            var clock = Stopwatch.StartNew();
            holder.Kill();
            var released = await watch.WaitForAsync(group, OwnerKind.None);
            latencies.Add(clock.Elapsed.TotalMilliseconds);
            Assert.Equal("connection lost", await watch.WaitForSessionEndedAsync(held.OwnerSession));

            Assert.Equal((0u, DomainKind.Default, held.Generation), (released.OwnerCount, released.Domain, released.Generation));
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30), $"release took {clock.Elapsed}");
        }
        output.WriteLine($"SIGKILL -> watcher saw release: {string.Join(", ", latencies.Select(l => $"{l:F1} ms"))}");
        var stats = await broker.StatsAsync();
        Assert.Equal((0u, 0u, 0u, 3ul), (stats.Sessions, stats.Containers, stats.UserOwnedGroups, stats.SessionsClosed));
    }

    /// <summary>
    /// The sigkill benchmark's lean client, written from the protos alone in another language
    /// (Python's standard library: HTTP/2 frames, HPACK literals, gRPC framing, protobuf by hand),
    /// opens a session and claims a group as the client library does; killed, it loses the group
    /// as soon as the broker sees its connection die, its session ended as connection lost.
    /// </summary>
    [Fact]
    public async Task SigKill_LeanClientFromTheProtosAlone_HeldTheGroup_WatcherSeesReleaseBeforeLeaseCouldExpire()
    {
        await using var broker = await LiveBroker.StartAsync("--lease-ttl-ms", "60000");
        await using var watch = await GroupWatch.StartAsync(broker.Client);
        using var probe = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        probe.Start();
        var port = ((System.Net.IPEndPoint)probe.LocalEndpoint).Port;
        await using var holder = ClientProcess.StartProgram("python3", "lean_client.py", withInput: true,
            Path.Combine(AppContext.BaseDirectory, "lean_client.py"), "hold", broker.Address, "15", port.ToString(System.Globalization.CultureInfo.InvariantCulture));
        var line = await holder.WaitForLineAsync("holding 15 session ", StartupTimeout);
        var session = ulong.Parse(line.Split(' ')[^1], System.Globalization.CultureInfo.InvariantCulture);
        var held = await watch.WaitForAsync(15, OwnerKind.User);
        Assert.Equal((session, 1u), (held.OwnerSession, held.OwnerCount));

        var clock = Stopwatch.StartNew();
        holder.Kill();
        var released = await watch.WaitForAsync(15, OwnerKind.None);
        output.WriteLine($"SIGKILL of the lean client -> watcher saw release after {clock.Elapsed.TotalMilliseconds:F1} ms");
        Assert.Equal("connection lost", await watch.WaitForSessionEndedAsync(session));
        Assert.Equal((0u, held.Generation), (released.OwnerCount, released.Generation));
        var stats = await broker.StatsAsync();
        Assert.Equal((0u, 0u, 0u), (stats.Sessions, stats.Containers, stats.UserOwnedGroups));
    }

    [Fact]
    public async Task SigStop_HungClient_LosesOwnershipWithinLeaseTtlPlusOneSecond()
    {
        var ttl = TimeSpan.FromMilliseconds(1000);
        await using var broker = await LiveBroker.StartAsync("--lease-ttl-ms", "1000");
        await using var watch = await GroupWatch.StartAsync(broker.Client);
        await using var holder = ClientProcess.StartDmactl(broker.Address, "hold", "16");
        await holder.WaitForLineAsync("holding group 16", StartupTimeout);
        await watch.WaitForAsync(16, OwnerKind.User);

        var clock = Stopwatch.StartNew();
        holder.Stop();
        await watch.WaitForAsync(16, OwnerKind.None);
        var elapsed = clock.Elapsed;
        holder.Continue();

        output.WriteLine($"SIGSTOP -> release after {elapsed.TotalMilliseconds:F0} ms (lease TTL {ttl.TotalMilliseconds} ms)");
        Assert.True(elapsed <= ttl + TimeSpan.FromSeconds(1), $"a hung client kept its group for {elapsed}, more than TTL + 1 s");
        // The thawed client learns that its session is gone and exits with an error.
        await holder.WaitForLineAsync("ended", StartupTimeout);
    }
}
