using DmaBroker.Client;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Integration.Tests;

/// <summary>
/// SPEC §15's local fast path as a user runs it: the sample drivers with <c>--shared</c> against
/// a broker process on a Unix socket, their rings and buffers in shared memory; and the broker's
/// files under /dev/shm gone whenever a session ends (SIGKILLed client, broker stop).
/// </summary>
public sealed class SharedMemoryDriverTests
{
    private const string Nvme = "0000:01:00.0";
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);

    [Fact]
    public async Task NvmeDriver_Shared_OverTheUnixSocket_VerifiesItsDataAndLeavesNothing()
    {
        await using var broker = await UnixBroker.StartAsync();

        await using var driver = ClientProcess.StartNvmeDriver(broker.Unix, Nvme, "--shared", "--qd", "8", "--blocks", "32", "--io-size", "128k");
        var exit = await driver.WaitForExitAsync(Timeout);

        Assert.True(exit == 0, $"{driver.Name} exited {exit}:\n{driver.Transcript}");
        Assert.Equal("done: 32 writes + 32 reads of 128 KiB at QD 8, data verified, through shared memory", driver.Stdout[^1]);
        Assert.Contains(driver.Stdout, l => l.Contains("KiB of shared memory at vaddr", StringComparison.Ordinal));
        // Doorbell Buffer Config: tails and heads in shared memory too, MMIO doorbells only when EventIdx asks.
        Assert.Contains(driver.Stdout, l => l.StartsWith("shadow doorbells at IOVA 0x", StringComparison.Ordinal));
        Assert.Matches(@"^shadow doorbells: \d+ MMIO doorbells for 64 commands, \d+ completions taken by watching the ring$",
            Assert.Single(driver.Stdout, l => l.StartsWith("shadow doorbells: ", StringComparison.Ordinal)));
        Assert.Empty(broker.Files());
        var stats = await broker.Live.StatsAsync();
        Assert.Equal((0u, 0u, 0UL), (stats.Sessions, stats.UserOwnedGroups, stats.MemoryBytes));
    }

    [Fact]
    public async Task StreamingDriver_Shared_OverTheUnixSocket_KeepsItsDataIntact()
    {
        await using var broker = await UnixBroker.StartAsync();

        await using var driver = ClientProcess.StartStreamingDriver(broker.Unix, "0000:09:00.0", "--shared", "--packets", "3000", "--ring", "128");
        var exit = await driver.WaitForExitAsync(Timeout);

        Assert.True(exit == 0, $"{driver.Name} exited {exit}:\n{driver.Transcript}");
        Assert.EndsWith("data intact, through shared memory", driver.Stdout[^1], StringComparison.Ordinal);
        Assert.Empty(broker.Files());
    }

    [Theory]
    [InlineData("NvmeDriver")]
    [InlineData("StreamingDriver")]
    public async Task Sample_SharedOverTcp_ExitsTwoSayingItNeedsAUnixAddress(string sample)
    {
        await using var broker = await UnixBroker.StartAsync();

        await using var driver = sample == "NvmeDriver"
            ? ClientProcess.StartNvmeDriver(broker.Live.Address, Nvme, "--shared")
            : ClientProcess.StartStreamingDriver(broker.Live.Address, "0000:09:00.0", "--shared");
        var exit = await driver.WaitForExitAsync(Timeout);

        Assert.Equal(2, exit);
        Assert.Contains("--shared needs a unix:// broker address", Assert.Single(driver.Stderr), StringComparison.Ordinal);
    }

    /// <summary>
    /// The shadow doorbell page is device DMA like any other (SPEC §6): an IOMMU fault on the
    /// controller's first access after the driver's first I/O doorbell, its read of the shadow tail,
    /// makes the controller fatal (CSTS.CFS); the driver, finding no completion and no interrupt,
    /// reads CSTS and reports it with the fault, at the shadow page's IOVA.
    /// </summary>
    [Fact]
    public async Task NvmeDriver_Shared_ShadowDoorbellReadFaults_ControllerFatalReportedWithTheFault()
    {
        await using var broker = await UnixBroker.StartAsync();
        await using var driver = ClientProcess.StartPausedNvmeDriver(broker.Unix, Nvme, "--shared");
        await driver.WaitForLineAsync("paused before I/O", Timeout);
        var mapped = Assert.Single(driver.Stdout, l => l.StartsWith("mapped shadow doorbells: ", StringComparison.Ordinal));
        var shadowIova = System.Text.RegularExpressions.Regex.Match(mapped, " to IOVA (0x[0-9a-f]+) ").Groups[1].Value;

        var faultId = await broker.Live.Client.Admin.InjectFaultAsync(new FaultInjection(Nvme, FaultKind.IommuFault) { Count = 1 });
        await driver.WriteLineAsync("");
        var exit = await driver.WaitForExitAsync(Timeout);

        Assert.True(exit == 1, $"{driver.Name} exited {exit}:\n{driver.Transcript}");
        Assert.Equal(1ul, (await broker.Live.Client.Admin.ListFaultsAsync()).Single(f => f.FaultId == faultId).Fired);
        // The driver names the fault when its session event came before its read of CSTS (as
        // NvmeDriverFaultTests allow, that order is not guaranteed on a loaded machine); named, it is
        // the controller's read of the shadow page.
        var line = Assert.Single(driver.Stderr);
        var fatal = "nvme-driver: queue 1: controller fatal status (CSTS 0x3) with 16 commands outstanding";
        Assert.True(line == fatal || line == $"{fatal}; last IOMMU fault: Read at IOVA {shadowIova}, Unmapped", line);
    }

    [Fact]
    public async Task SharedMemory_ClientSigKilled_FileUnlinkedBeforeItsGroupIsReleased()
    {
        await using var broker = await UnixBroker.StartAsync();
        await using var watch = await GroupWatch.StartAsync(broker.Live.Client);
        var group = (await broker.Live.Client.ListDevicesAsync()).Devices.Single(d => d.Address == Nvme).GroupId;
        await using var driver = ClientProcess.StartPausedNvmeDriver(broker.Unix, Nvme, "--shared");
        await driver.WaitForLineAsync("paused before I/O", Timeout);
        var owner = (await watch.WaitForAsync(group, OwnerKind.User)).OwnerSession;
        var file = Assert.Single(broker.Files());
        Assert.Contains($"-s{owner}-", file, StringComparison.Ordinal);

        driver.Kill();
        await watch.WaitUntilAsync("the driver's group released", groups => groups[group].OwnerKind != OwnerKind.User, Timeout);

        // The file went before the release was published (teardown frees memory, then releases groups).
        Assert.False(File.Exists(file));
        Assert.Empty(watch.Violations);
    }

    [Fact]
    public async Task SharedMemory_BrokerStopped_UnlinksEveryFile()
    {
        await using var broker = await UnixBroker.StartAsync();
        await using var driver = ClientProcess.StartPausedNvmeDriver(broker.Unix, Nvme, "--shared");
        await driver.WaitForLineAsync("paused before I/O", Timeout);
        Assert.Single(broker.Files());

        Assert.Equal(0, await broker.Live.StopAsync());

        Assert.Empty(broker.Files());
    }

    [Fact]
    public async Task SharedMemory_BrokerKilled_TheNextBrokerRemovesTheFileItLeft()
    {
        string file;
        await using (var killed = await UnixBroker.StartAsync())
        {
            await using var driver = ClientProcess.StartPausedNvmeDriver(killed.Unix, Nvme, "--shared");
            await driver.WaitForLineAsync("paused before I/O", Timeout);
            file = Assert.Single(killed.Files());
            killed.Live.Kill();
        }
        Assert.True(File.Exists(file), "a SIGKILLed broker cannot unlink its files");

        await using var next = await UnixBroker.StartAsync();

        Assert.False(File.Exists(file));
    }

    /// <summary>A broker process with a loopback listener (for watchers and admin calls) and a Unix socket (for the drivers).</summary>
    private sealed class UnixBroker : IAsyncDisposable
    {
        private readonly string _directory;

        private UnixBroker(LiveBroker live, string directory)
        {
            Live = live;
            _directory = directory;
        }

        public LiveBroker Live { get; }

        public string Unix => $"unix://{Path.Combine(_directory, "broker.sock")}";

        public static async Task<UnixBroker> StartAsync()
        {
            var directory = Directory.CreateTempSubdirectory("dmabroker-shm-").FullName;
            try
            {
                return new UnixBroker(await LiveBroker.StartAsync("--listen", $"unix://{Path.Combine(directory, "broker.sock")}"), directory);
            }
            catch
            {
                Directory.Delete(directory, recursive: true);
                throw;
            }
        }

        /// <summary>The broker's shared-memory files now under /dev/shm.</summary>
        public string[] Files() => Directory.GetFiles("/dev/shm", $"dmabroker-{Live.Pid}-*");

        public async ValueTask DisposeAsync()
        {
            await Live.DisposeAsync();
            Directory.Delete(_directory, recursive: true);
        }
    }
}
