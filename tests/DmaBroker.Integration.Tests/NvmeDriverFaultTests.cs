using System.Globalization;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Integration.Tests;

/// <summary>
/// The NVMe sample driver under each kind of injected fault (SPEC §14), against a broker process:
/// it either survives the fault (a late or lost interrupt) or exits 1 with one clear line on
/// stderr within its bounded waits, and in every case the broker ends with nothing held — no
/// session, no user-owned group. SURPRISE_REMOVE and LINK_DOWN act at once, so they are injected
/// while the driver is paused before its first I/O; the other kinds are armed before it starts.
/// </summary>
public sealed class NvmeDriverFaultTests
{
    private const string Nvme = "0000:01:00.0";
    // The driver's own bounds: CAP.TO (7.5 s) for the controller to become ready, 10 s for a command.
    private static readonly TimeSpan ExitTimeout = TimeSpan.FromSeconds(30);
    private static readonly TimeSpan PauseTimeout = TimeSpan.FromSeconds(30);
    private const string Done = "done: 64 writes + 64 reads of 32 KiB at QD 16, data verified";

    public static TheoryData<FaultKind> Kinds =>
        [FaultKind.IommuFault, FaultKind.DeviceError, FaultKind.DropInterrupt, FaultKind.DelayInterrupt, FaultKind.SlowReset, FaultKind.SurpriseRemove, FaultKind.LinkDown];

    [Theory]
    [MemberData(nameof(Kinds))]
    public async Task NvmeDriver_UnderAnInjectedFault_FailsCleanlyOrSurvivesAndLeavesNothingHeld(FaultKind kind)
    {
        var (fault, duringIo, exitCode, line) = Expectation(kind);
        await using var broker = await LiveBroker.StartAsync();
        await using var watch = await GroupWatch.StartAsync(broker.Client);

        ClientProcess driver;
        ulong faultId;
        if (duringIo)
        {
            driver = ClientProcess.StartPausedNvmeDriver(broker.Address, Nvme);
            await driver.WaitForLineAsync("paused before I/O", PauseTimeout);
            faultId = await broker.Client.Admin.InjectFaultAsync(fault);
            await driver.WriteLineAsync("");
        }
        else
        {
            faultId = await broker.Client.Admin.InjectFaultAsync(fault);
            driver = ClientProcess.StartNvmeDriver(broker.Address, Nvme);
        }
        await using (driver)
        {
            var exit = await driver.WaitForExitAsync(ExitTimeout);

            Assert.True(exit == exitCode, $"{kind}: {driver.Name} exited {exit}, not {exitCode}:\n{driver.Transcript}");
            // The fault bit: a survived one was met, not missed.
            Assert.True((await broker.Client.Admin.ListFaultsAsync()).Single(f => f.FaultId == faultId).Fired > 0, $"{kind} never fired:\n{driver.Transcript}");
            if (exitCode == 0)
                Assert.Equal(Done, driver.Stdout[^1]);
            if (line is null)
            {
                // A survived fault prints nothing but, on a machine slow enough to let a late
                // interrupt miss the driver's 0.5 s, the warning that it read the queue itself.
                Assert.All(driver.Stderr, l => Assert.StartsWith("nvme-driver: warning: ", l, StringComparison.Ordinal));
            }
            else
                Assert.True(driver.Stderr.Count == 1 && (line.EndsWith('…') ? driver.Stderr[0].StartsWith(line[..^1], StringComparison.Ordinal) : driver.Stderr[0] == line),
                    $"{kind}: expected the one stderr line '{line}':\n{driver.Transcript}");

            var session = SessionId(driver.Stdout);
            await watch.WaitForSessionEndedAsync(session);
        }
        await watch.WaitUntilAsync("no user-owned group", _ => watch.UserOwners().Count == 0);
        Assert.Empty(watch.Violations);
        var stats = await broker.StatsAsync();
        Assert.Equal((0u, 0u, 0u, 0u, 0UL), (stats.Sessions, stats.UserOwnedGroups, stats.OpenDevices, stats.Mappings, stats.MemoryBytes));
    }

    /// <summary>What each kind is armed with, whether it is injected during I/O, and the exit code and the one stderr line it ends with (up to the … when it ends with one).</summary>
    private static (FaultInjection Fault, bool DuringIo, int ExitCode, string? Line) Expectation(FaultKind kind)
    {
        var fault = new FaultInjection(Nvme, kind);
        return kind switch
        {
            // The first DMA is the controller fetching Identify from the admin SQ: the fetch faults, CSTS.CFS is set.
            FaultKind.IommuFault => (fault with { Count = 1 }, false, 1,
                // (It names the last IOMMU fault when that event reached it first: "; last IOMMU fault: Read at IOVA 0x100000000, Unmapped".)
                "nvme-driver: queue 0: controller fatal status (CSTS 0x3) with 1 command outstanding…"),
            FaultKind.DeviceError => (fault with { Count = 1 }, false, 1,
                "nvme-driver: Identify Controller: Data Transfer Error (SCT 0, SC 0x04)"),
            // Every interrupt lost (the admin queue's on vector 0 too, which the driver polls anyway):
            // each I/O wait costs 0.5 s, after which the driver reads the completion queue itself.
            FaultKind.DropInterrupt => (fault, false, 0,
                "nvme-driver: warning: 128 completions found by reading the completion queue after no interrupt came within 0.5 s"),
            // Every interrupt 0.2 s late: within the 0.5 s the driver trusts an interrupt, so it runs as usual.
            FaultKind.DelayInterrupt => (fault with { Delay = TimeSpan.FromMilliseconds(200) }, false, 0, null),
            // CSTS.RDY rises later than CAP.TO (7.5 s) allows.
            FaultKind.SlowReset => (fault with { Count = 1, Delay = TimeSpan.FromSeconds(9) }, false, 1,
                "nvme-driver: no CSTS.RDY after CC.EN = 1 within 7.5 s (CSTS 0x0)"),
            // Its next register access finds no device.
            FaultKind.SurpriseRemove => (fault, true, 1, "nvme-driver: ENODEV: no device 0000:01:00.0"),
            // The broker cut the session's streams and ended it: the client saw its stream reset (how
            // HTTP/2 words that varies), and the next call's token is unknown.
            FaultKind.LinkDown => (fault, true, 1, "nvme-driver: session 1 ended: lost the broker: …"),
            _ => throw new ArgumentOutOfRangeException(nameof(kind), kind, null),
        };
    }

    /// <summary>The session the driver opened, from its "session N: container M set on group G" line.</summary>
    private static ulong SessionId(IReadOnlyList<string> stdout)
    {
        var line = stdout.Single(l => l.StartsWith("session ", StringComparison.Ordinal));
        return ulong.Parse(line["session ".Length..line.IndexOf(':', StringComparison.Ordinal)], CultureInfo.InvariantCulture);
    }
}
