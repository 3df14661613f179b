using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using DmaBroker.Client;
using DmaBroker.Server.Tests;

namespace DmaBroker.Integration.Tests;

/// <summary>A broker for the dmactl tests that leave its state as they found it.</summary>
public sealed class DmactlBrokerFixture : IAsyncLifetime
{
    private LiveBroker? _broker;

    public LiveBroker Broker => _broker ?? throw new InvalidOperationException("not started");

    public async Task InitializeAsync() => _broker = await LiveBroker.StartAsync();

    public async Task DisposeAsync()
    {
        if (_broker is not null)
            await _broker.DisposeAsync();
    }
}

/// <summary>
/// dmactl as a user and a script see it: the real process against a real broker process. Strict
/// parsing and exit codes (0 ok, 1 rejected, 2 usage, 3 unreachable), help, version, completion,
/// colours and progress only on a terminal, --json, topology export, the driver-name check.
/// </summary>
public sealed class DmactlTests(DmactlBrokerFixture fixture) : IClassFixture<DmactlBrokerFixture>, IDisposable
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);
    private readonly string _directory = Directory.CreateTempSubdirectory("dmactl-tests-").FullName;

    private LiveBroker Broker => fixture.Broker;

    public void Dispose() => Directory.Delete(_directory, recursive: true);

    /// <summary>Runs dmactl against <paramref name="broker"/> to its exit.</summary>
    private static async Task<(int Exit, IReadOnlyList<string> Stdout, IReadOnlyList<string> Stderr)> RunAtAsync(string broker, params string[] args)
    {
        await using var dmactl = ClientProcess.StartDmactl(broker, args);
        var exit = await dmactl.WaitForExitAsync(Timeout);
        return (exit, dmactl.Stdout, dmactl.Stderr);
    }

    private Task<(int Exit, IReadOnlyList<string> Stdout, IReadOnlyList<string> Stderr)> RunAsync(params string[] args) => RunAtAsync(Broker.Address, args);

    // Each of these would succeed (exit 0) against the live broker were it not for the mistake.
    [Theory]
    [InlineData("unrecognized command or argument '--bogus'", "groups", "--bogus")]
    [InlineData("unrecognized command or argument 'extra'", "groups", "extra")]
    [InlineData("unrecognized command or argument '15'", "group", "14", "15")]
    [InlineData("<group> must be a whole number such as 14, got 'abc'", "group", "abc")]
    [InlineData("unknown command 'grups'; did you mean 'groups'?", "grups")]
    [InlineData("--seconds takes a number from 1 to 3600, got 0", "bench", "0000:08:00.0", "--seconds", "0")]
    [InlineData("required argument missing for command: 'group'", "group")]
    [InlineData("required command was not provided")]
    public async Task Parse_Mistake_ExitsTwoWithUsageOnStderrOnly(string expected, params string[] args)
    {
        var (exit, stdout, stderr) = await RunAsync(args);
        Assert.Equal(2, exit);
        Assert.Empty(stdout);
        Assert.StartsWith("dmactl: ", stderr[0], StringComparison.Ordinal);
        Assert.Contains(expected, stderr[0], StringComparison.OrdinalIgnoreCase);
        Assert.Contains(stderr, line => line.StartsWith("Usage: dmactl", StringComparison.Ordinal));
    }

    [Fact]
    public async Task Parse_MistakeWithJson_ErrorIsOneJsonDocumentOnStderr()
    {
        var (exit, stdout, stderr) = await RunAsync("--json", "group", "14", "15");
        Assert.Equal(2, exit);
        Assert.Empty(stdout);
        var error = Assert.Single(stderr);
        using var json = JsonDocument.Parse(error);
        var e = json.RootElement.GetProperty("error");
        Assert.Equal(("usage", "EINVAL", 22), (e.GetProperty("kind").GetString(), e.GetProperty("errno").GetString(), e.GetProperty("code").GetInt32()));
        Assert.Contains("'15'", e.GetProperty("message").GetString(), StringComparison.Ordinal);
    }

    [Fact]
    public async Task Help_RootAndCommand_GeneratedWithEveryCommandAndItsArguments()
    {
        var (exit, stdout, stderr) = await RunAsync("--help");
        Assert.Equal((0, 0), (exit, stderr.Count));
        string[] commands = ["devices", "groups", "group", "watch", "hold", "bind", "unbind", "revoke", "sessions", "stats", "topology", "dma", "bench", "fault", "faults", "version", "completion"];
        Assert.All(commands, c => Assert.Contains(stdout, line => line.TrimStart().StartsWith(c + " ", StringComparison.Ordinal)));
        Assert.All(["--broker", "--token", "--cacert", "--cert", "--key", "--json", "--version"], o => Assert.Contains(stdout, line => line.Contains(o, StringComparison.Ordinal)));

        (exit, stdout, _) = await RunAsync("bench", "--help");
        Assert.Equal(0, exit);
        Assert.Contains(stdout, line => line.Contains("dmactl bench <address> [options]", StringComparison.Ordinal));
        Assert.All(["--size", "--seconds", "--window", "--broker"], o => Assert.Contains(stdout, line => line.TrimStart().StartsWith(o, StringComparison.Ordinal)));
    }

    [Fact]
    public async Task Version_CommandOptionAndJson_PrintTheProjectVersionWithoutABroker()
    {
        var version = FileVersionInfo.GetVersionInfo(Path.Combine(AppContext.BaseDirectory, "dmactl.dll")).ProductVersion!;
        Assert.Matches(@"^\d+\.\d+\.\d+$", version);
        // A broker address nothing listens on: printing the version must not need one.
        var nowhere = $"http://127.0.0.1:{ClosedPort()}";
        foreach (var (args, expected) in new[]
        {
            (new[] { "version" }, $"dmactl {version}"),
            (["--version"], version),
            (["--json", "version"], $$"""{"version":"{{version}}"}"""),
        })
        {
            var (exit, stdout, stderr) = await RunAtAsync(nowhere, args);
            Assert.Equal((0, 0), (exit, stderr.Count));
            Assert.Equal(expected, Assert.Single(stdout));
        }
    }

    [Fact]
    public async Task Completion_SuggestDirective_CompletesCommandsOptionsAndDrivers()
    {
        // What a shell's completion function asks: the directive first, with the cursor at the end of the line.
        async Task<IReadOnlyList<string>> SuggestAsync(string line)
        {
            await using var dmactl = ClientProcess.Start("dmactl.dll", $"[suggest:{line.Length}]", line);
            Assert.Equal(0, await dmactl.WaitForExitAsync(Timeout));
            return dmactl.Stdout;
        }

        Assert.Equal(["group", "groups"], await SuggestAsync("dmactl gro"));
        Assert.Equal(["vfio-pci"], await SuggestAsync("dmactl bind 0000:07:00.0 vf"));
        Assert.Equal(["--seconds"], await SuggestAsync("dmactl bench --sec"));
        // --json is a flag: the word after it is a command, not its value.
        Assert.Superset(new HashSet<string> { "bench", "bind" }, (await SuggestAsync("dmactl --json b")).ToHashSet());

        var (exit, script, _) = await RunAsync("completion", "bash");
        Assert.Equal(0, exit);
        Assert.Contains(script, line => line.StartsWith("complete ", StringComparison.Ordinal) && line.EndsWith(" dmactl", StringComparison.Ordinal));
        Assert.Contains(script, line => line.Contains("[suggest:${COMP_POINT}]", StringComparison.Ordinal));
    }

    [Fact]
    public async Task Tables_Redirected_PlainTextWithoutAnsiEscapes()
    {
        var (exit, stdout, stderr) = await RunAsync("groups");
        Assert.Equal((0, 0), (exit, stderr.Count));
        Assert.Equal(["GROUP", "OWNER", "COUNT", "SESSION", "GEN", "DOMAIN", "DEVICES"], stdout[0].Split(' ', StringSplitOptions.RemoveEmptyEntries));
        Assert.Contains(stdout, line => line.Split(' ', StringSplitOptions.RemoveEmptyEntries) is ["10", "kernel", "2", "-", "0", "default", "0000:02:00.0,0000:02:00.1"]);
        Assert.Equal(19, stdout.Count);
        Assert.All(stdout, line => Assert.DoesNotContain('\x1b', line));
        Assert.All(stdout, line => Assert.Equal(line.TrimEnd(), line));
    }

    [Fact]
    public async Task Tables_OnATerminal_Coloured()
    {
        await using var dmactl = ClientProcess.StartOnTerminal("dmactl.dll", null, "--broker", Broker.Address, "groups");
        Assert.Equal(0, await dmactl.WaitForExitAsync(Timeout));
        // Bold headers and a coloured kernel owner: the same table, with escapes.
        Assert.Contains("\x1b[1mGROUP\x1b[0m", dmactl.Transcript, StringComparison.Ordinal);
        Assert.Contains("kernel\x1b[0m", dmactl.Transcript, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Bench_OnATerminal_ProgressBarOnStderrAndPlainResultOnStdout()
    {
        var stdoutFile = Path.Combine(_directory, "bench.out");
        await using var bench = ClientProcess.StartOnTerminal("dmactl.dll", stdoutFile,
            "--broker", Broker.Address, "bench", FreeEduDevices.All[0].Address, "--seconds", "1", "--size", "4096");
        Assert.Equal(0, await bench.WaitForExitAsync(Timeout));
        // The terminal (stderr) showed a progress bar: its description, percentage and bar characters.
        Assert.Contains("DMA writes of 4096 bytes", bench.Transcript, StringComparison.Ordinal);
        Assert.Contains("100%", bench.Transcript, StringComparison.Ordinal);
        Assert.Contains("━", bench.Transcript, StringComparison.Ordinal);
        // stdout (a file) got the result alone, without escapes or progress.
        var result = Assert.Single(await File.ReadAllLinesAsync(stdoutFile));
        Assert.Matches(@"^0000:08:00\.0: \d+ DMA writes of 4096 bytes in \d+\.\d\d s: \d+ ops/s, \d+\.\d MiB/s$", result);
    }

    [Theory]
    [InlineData("bench", "--seconds", "1")]
    [InlineData("dma", "--bytes", "65536")]
    public async Task DeviceCommand_Redirected_OneResultLineAndNoProgress(string command, params string[] options)
    {
        var (exit, stdout, stderr) = await RunAsync([command, FreeEduDevices.All[1].Address, .. options]);
        Assert.Equal(0, exit);
        Assert.Empty(stderr);
        var line = Assert.Single(stdout);
        Assert.StartsWith("0000:09:00.0: ", line, StringComparison.Ordinal);
        Assert.DoesNotContain('\x1b', line);
    }

    [Fact]
    public async Task Dma_OnATerminal_ProgressOnStderrOnly()
    {
        var stdoutFile = Path.Combine(_directory, "dma.out");
        await using var dma = ClientProcess.StartOnTerminal("dmactl.dll", stdoutFile,
            "--broker", Broker.Address, "dma", FreeEduDevices.All[2].Address, "--bytes", "65536");
        Assert.Equal(0, await dma.WaitForExitAsync(Timeout));
        Assert.Contains("DMA round trip, 65536 bytes", dma.Transcript, StringComparison.Ordinal);
        var result = Assert.Single(await File.ReadAllLinesAsync(stdoutFile));
        Assert.Matches(@"^0000:0a:00\.0: device wrote 65536 bytes at IOVA 0x100000, CPU read them, device read them back: intact \(", result);
    }

    [Fact]
    public async Task Json_ReadCommands_OneDocumentEachWithNumbersAndShortEnums()
    {
        var (device, group) = FreeEduDevices.All[3];
        await using var hold = ClientProcess.StartDmactl(Broker.Address, "--json", "hold", group.ToString(CultureInfo.InvariantCulture));
        var held = await hold.WaitForLineAsync("\"ownerKind\":\"user\"", Timeout);
        using (var json = JsonDocument.Parse(held))
        {
            var g = json.RootElement;
            Assert.Equal(JsonValueKind.Number, g.GetProperty("ownerSession").ValueKind);
            Assert.Equal(JsonValueKind.Number, g.GetProperty("generation").ValueKind);
            Assert.Equal(("user", "user", group), (g.GetProperty("ownerKind").GetString(), g.GetProperty("domain").GetString(), g.GetProperty("id").GetUInt32()));
        }

        foreach (var command in new[] { "devices", "groups", "group", "sessions", "stats" })
        {
            var (exit, stdout, stderr) = await RunAsync(command == "group" ? ["--json", command, "10"] : ["--json", command]);
            Assert.Equal((0, 0), (exit, stderr.Count));
            using var json = JsonDocument.Parse(Assert.Single(stdout));
            var root = json.RootElement;
            switch (command)
            {
                case "devices":
                    var edu = root.GetProperty("devices").EnumerateArray().Single(d => d.GetProperty("address").GetString() == device);
                    Assert.Equal((0x1234, 0x11e8, group), (edu.GetProperty("vendorId").GetInt32(), edu.GetProperty("deviceId").GetInt32(), edu.GetProperty("groupId").GetUInt32()));
                    Assert.True(edu.GetProperty("driverManagedDma").GetBoolean());
                    break;
                case "groups":
                    Assert.Equal(JsonValueKind.Number, root.GetProperty("revision").ValueKind);
                    var kinds = root.GetProperty("groups").EnumerateArray().Select(g => g.GetProperty("ownerKind").GetString()).Distinct().Order();
                    Assert.Equal(["kernel", "none", "user"], kinds);
                    break;
                case "group":
                    Assert.Equal(("kernel", 2u, "default"), (root.GetProperty("ownerKind").GetString(), root.GetProperty("ownerCount").GetUInt32(), root.GetProperty("domain").GetString()));
                    break;
                case "sessions":
                    var session = Assert.Single(root.GetProperty("sessions").EnumerateArray());
                    Assert.Equal(JsonValueKind.Number, session.GetProperty("sessionId").ValueKind);
                    Assert.Equal(JsonValueKind.Number, session.GetProperty("ageMs").ValueKind);
                    Assert.Equal([group], session.GetProperty("groups").EnumerateArray().Select(g => g.GetUInt32()));
                    break;
                case "stats":
                    Assert.Equal(1ul, root.GetProperty("userOwnedGroups").GetUInt64());
                    Assert.Equal(JsonValueKind.Number, root.GetProperty("sessionsOpened").ValueKind);
                    break;
            }
        }

        // A rejection, as JSON on stderr with the errno: a DMA-API driver into the held group.
        var (bindExit, bindOut, bindErr) = await RunAsync("--json", "bind", device, "nvme");
        Assert.Equal((1, 0), (bindExit, bindOut.Count));
        using (var json = JsonDocument.Parse(Assert.Single(bindErr)))
        {
            var e = json.RootElement.GetProperty("error");
            Assert.Equal(("rejected", "EBUSY", 16), (e.GetProperty("kind").GetString(), e.GetProperty("errno").GetString(), e.GetProperty("code").GetInt32()));
            Assert.Contains(device, e.GetProperty("message").GetString(), StringComparison.Ordinal);
        }
        var (plainExit, _, plainErr) = await RunAsync("bind", device, "nvme");
        Assert.Equal(1, plainExit);
        Assert.StartsWith("dmactl: EBUSY: ", Assert.Single(plainErr), StringComparison.Ordinal);

        hold.Interrupt();
        Assert.Equal(0, await hold.WaitForExitAsync(Timeout));
        // With --json, hold printed one document and nothing more.
        Assert.Equal([held], hold.Stdout);
    }

    [Fact]
    public async Task Json_DmaAndRevoke_OneObjectEach()
    {
        var (exit, stdout, stderr) = await RunAsync("--json", "dma", FreeEduDevices.All[1].Address, "--bytes", "8192");
        Assert.Equal((0, 0), (exit, stderr.Count));
        using (var json = JsonDocument.Parse(Assert.Single(stdout)))
        {
            var r = json.RootElement;
            Assert.Equal((true, 8192, 0x100000ul), (r.GetProperty("ok").GetBoolean(), r.GetProperty("bytes").GetInt32(), r.GetProperty("iova").GetUInt64()));
        }

        var (_, group) = FreeEduDevices.All[0];
        await using var hold = ClientProcess.StartDmactl(Broker.Address, "--json", "hold", group.ToString(CultureInfo.InvariantCulture));
        using var held = JsonDocument.Parse(await hold.WaitForLineAsync("\"ownerKind\":\"user\"", Timeout));
        var session = held.RootElement.GetProperty("ownerSession").GetUInt64();
        (exit, stdout, stderr) = await RunAsync("--json", "revoke", session.ToString(CultureInfo.InvariantCulture), "maintenance");
        Assert.Equal((0, 0), (exit, stderr.Count));
        Assert.Equal($$"""{"sessionId":{{session}},"revoked":true}""", Assert.Single(stdout));
        // The holder is told: its session ended, exit 1.
        Assert.Equal(1, await hold.WaitForExitAsync(Timeout));
        Assert.Contains(hold.Stderr, line => line.Contains($"session {session} ended", StringComparison.Ordinal) && line.Contains("maintenance", StringComparison.Ordinal));
    }

    [Fact]
    public async Task Fault_InjectListClear_TableJsonAndRefusals()
    {
        var (device, _) = FreeEduDevices.All[2];
        var (exit, stdout, stderr) = await RunAsync("fault", device, "drop-interrupt", "--count", "3", "--probability", "50", "--seed", "7");
        Assert.Equal((0, 0), (exit, stderr.Count));
        Assert.Matches($"^fault [0-9]+: drop-interrupt armed on {device}$", Assert.Single(stdout));
        (exit, _, stderr) = await RunAsync("fault", "0000:01:00.0", "device-error", "--opcode", "0x02", "--lba-start", "8", "--lba-count", "4", "--status", "0x281");
        Assert.Equal((0, 0), (exit, stderr.Count));

        (exit, stdout, _) = await RunAsync("faults");
        Assert.Equal(0, exit);
        Assert.Contains(stdout, l => l.Contains(device, StringComparison.Ordinal) && l.Contains("drop-interrupt", StringComparison.Ordinal)
            && l.Contains("count 3, probability 50% (seed 7)", StringComparison.Ordinal));
        Assert.Contains(stdout, l => l.Contains("device-error", StringComparison.Ordinal) && l.Contains("status 0x281, opcode 0x02, lba [8, +4)", StringComparison.Ordinal));

        (exit, stdout, _) = await RunAsync("--json", "faults");
        Assert.Equal(0, exit);
        using (var json = JsonDocument.Parse(Assert.Single(stdout)))
        {
            var faults = json.RootElement.GetProperty("faults").EnumerateArray().ToList();
            Assert.Equal(2, faults.Count);
            Assert.Equal(("drop_interrupt", 50, 0), (faults[0].GetProperty("kind").GetString(), faults[0].GetProperty("probabilityPercent").GetInt32(), faults[0].GetProperty("fired").GetInt32()));
            Assert.Equal((2, 0x281), (faults[1].GetProperty("opcode").GetInt32(), faults[1].GetProperty("status").GetInt32()));
        }

        // A kind dmactl does not know is a usage error; one the broker refuses is exit 1 with its errno.
        (exit, _, stderr) = await RunAsync("fault", device, "melt");
        Assert.Equal(2, exit);
        Assert.Contains("melt", stderr[0], StringComparison.Ordinal);
        (exit, _, stderr) = await RunAsync("fault", device, "delay-interrupt");
        Assert.Equal(1, exit);
        Assert.StartsWith("dmactl: EINVAL: ", Assert.Single(stderr), StringComparison.Ordinal);

        (exit, stdout, _) = await RunAsync("faults", "--clear", device);
        Assert.Equal((0, $"cleared 1 fault(s) of {device}"), (exit, Assert.Single(stdout)));
        (exit, stdout, _) = await RunAsync("--json", "faults", "--clear", "all");
        Assert.Equal((0, "{\"cleared\":1,\"address\":\"\"}"), (exit, Assert.Single(stdout)));

        // A DMA the fault refuses is a rejection with the fault, not a crash.
        (exit, _, _) = await RunAsync("fault", device, "iommu-fault", "--count", "1");
        Assert.Equal(0, exit);
        (exit, stdout, stderr) = await RunAsync("dma", device);
        Assert.Equal((1, 0), (exit, stdout.Count));
        Assert.Equal("dmactl: EFAULT: DMA fault at IOVA 0x100000: Write Unmapped", Assert.Single(stderr));
        (exit, _, _) = await RunAsync("faults", "--clear", device);
        Assert.Equal(0, exit);
    }

    [Fact]
    public async Task Fault_LinkDownOnAHeldGroup_TheHolderLosesItsSession()
    {
        var (device, group) = FreeEduDevices.All[2];
        await using var hold = ClientProcess.StartDmactl(Broker.Address, "hold", group.ToString(CultureInfo.InvariantCulture));
        await hold.WaitForLineAsync("holding group", Timeout);

        var (exit, stdout, _) = await RunAsync("fault", device, "link-down");

        Assert.Equal(0, exit);
        Assert.EndsWith($"link-down on {device}, done", Assert.Single(stdout), StringComparison.Ordinal);
        Assert.Equal(1, await hold.WaitForExitAsync(Timeout));
        Assert.Contains(hold.Stderr, line => line.Contains("ended: lost the broker", StringComparison.Ordinal));
        (exit, _, _) = await RunAsync("faults", "--clear", device);
        Assert.Equal(0, exit);
    }

    [Fact]
    public async Task Watch_Json_OneObjectPerLine()
    {
        await using var watch = ClientProcess.StartDmactl(Broker.Address, "--json", "watch");
        var snapshot = await watch.WaitForLineAsync("\"snapshot\"", Timeout);
        using (var json = JsonDocument.Parse(snapshot))
            Assert.Equal(JsonValueKind.Number, json.RootElement.GetProperty("revision").ValueKind);
        await Broker.Client.Admin.BindDriverAsync("0000:07:00.0", "pci-stub");
        await Broker.Client.Admin.UnbindDriverAsync("0000:07:00.0");
        var change = await watch.WaitForLineAsync("\"driver\":\"pci-stub\"", Timeout);
        using (var json = JsonDocument.Parse(change))
            Assert.Equal("0000:07:00.0", json.RootElement.GetProperty("device").GetProperty("address").GetString());
        watch.Interrupt();
        Assert.Equal(0, await watch.WaitForExitAsync(Timeout));
        Assert.Empty(watch.Stderr);
    }

    [Fact]
    public async Task Bind_UnknownDriver_RefusedWithTheClosestKnownUnlessForced()
    {
        const string Device = "0000:07:00.0";
        var (exit, stdout, stderr) = await RunAsync("bind", Device, "vfio_pci");
        Assert.Equal((2, 0), (exit, stdout.Count));
        Assert.Contains("unknown driver 'vfio_pci'; did you mean 'vfio-pci'?", stderr[0], StringComparison.Ordinal);
        Assert.Contains("vfio-pci, pci-stub, pcieport", stderr[0], StringComparison.Ordinal);
        Assert.Contains("nvme, ixgbe, snd_hda_intel", stderr[0], StringComparison.Ordinal);
        Assert.Equal("", await DriverAsync(Device));

        (exit, stdout, _) = await RunAsync("bind", Device, "vfio_pci", "--force");
        Assert.Equal(0, exit);
        Assert.Equal([$"{Device}: driver vfio_pci, group 13"], stdout);
        Assert.Equal("vfio_pci", await DriverAsync(Device));

        (exit, stdout, _) = await RunAsync("unbind", Device);
        Assert.Equal((0, $"{Device}: driver none, group 13"), (exit, Assert.Single(stdout)));
        Assert.Equal("", await DriverAsync(Device));
    }

    private async Task<string> DriverAsync(string address) =>
        (await Broker.Client.ListDevicesAsync()).Devices.Single(d => d.Address == address).Driver;

    [Fact]
    public async Task Broker_HostPortWithoutScheme_IsHttp()
    {
        var hostPort = new Uri(Broker.Address).Authority;
        var (exit, stdout, stderr) = await RunAtAsync(hostPort, "group", "14");
        Assert.Equal((0, 0), (exit, stderr.Count));
        Assert.StartsWith("14 ", stdout[1], StringComparison.Ordinal);
    }

    [Fact]
    public async Task Unreachable_ConnectionRefused_ExitsThreeWithTheErrno()
    {
        var nowhere = $"127.0.0.1:{ClosedPort()}";
        var (exit, stdout, stderr) = await RunAtAsync(nowhere, "groups");
        Assert.Equal((3, 0), (exit, stdout.Count));
        Assert.Equal($"dmactl: cannot reach the broker at {nowhere}: Connection refused (ECONNREFUSED)", Assert.Single(stderr));

        (exit, _, stderr) = await RunAtAsync(nowhere, "--json", "groups");
        Assert.Equal(3, exit);
        using var json = JsonDocument.Parse(Assert.Single(stderr));
        var e = json.RootElement.GetProperty("error");
        Assert.Equal(("unreachable", "ECONNREFUSED", 111), (e.GetProperty("kind").GetString(), e.GetProperty("errno").GetString(), e.GetProperty("code").GetInt32()));
    }

    [Fact]
    public async Task Unreachable_TlsFailures_ExitThree()
    {
        // https to a listener that speaks plain HTTP/2: the handshake fails.
        var plain = "https://" + new Uri(Broker.Address).Authority;
        var (exit, _, stderr) = await RunAtAsync(plain, "groups");
        Assert.Equal(3, exit);
        Assert.StartsWith($"dmactl: cannot reach the broker at {plain}: ", Assert.Single(stderr), StringComparison.Ordinal);

        // A TLS broker whose certificate nothing here trusts: refused, until --cacert vouches for it.
        var pki = new TestPki(_directory);
        await using var tls = ClientProcess.Start(LiveBroker.AssemblyPath, "--listen", "https://127.0.0.1:0",
            "--tls-cert", pki.ServerCertFile, "--tls-key", pki.ServerKeyFile, "--Logging:LogLevel:Default=Warning", "--Logging:LogLevel:Microsoft.Hosting.Lifetime=Information");
        var listening = await tls.WaitForLineAsync("Now listening on: https://", Timeout);
        var address = listening[listening.IndexOf("https://", StringComparison.Ordinal)..].Trim();
        (exit, _, stderr) = await RunAtAsync(address, "groups");
        Assert.Equal(3, exit);
        Assert.Contains("certificate", Assert.Single(stderr), StringComparison.OrdinalIgnoreCase);
        (exit, _, stderr) = await RunAtAsync(address, "--cacert", pki.CaFile, "groups");
        Assert.Equal((0, 0), (exit, stderr.Count));
    }

    [Fact]
    public async Task Watch_BrokerKilled_ExitsThreeWithOneLineOnStderr()
    {
        var broker = await LiveBroker.StartAsync();
        await using (broker)
        {
            await using var watch = ClientProcess.StartDmactl(broker.Address, "watch");
            await watch.WaitForLineAsync("snapshot: 18 groups, 23 devices", Timeout);
            broker.Kill();
            Assert.Equal(3, await watch.WaitForExitAsync(Timeout));
            var line = Assert.Single(watch.Stderr);
            Assert.StartsWith($"dmactl: lost the broker at {broker.Address}: ", line, StringComparison.Ordinal);
        }
    }

    [Fact]
    public async Task Topology_FedBackToABroker_SameDevicesAndGroups()
    {
        // A state the default topology does not have: nvme unbound, a hot-added function, a driver bound.
        var source = await LiveBroker.StartAsync();
        await using (source)
        {
            await source.Client.Admin.UnbindDriverAsync("0000:01:00.0");
            await source.Client.Admin.AddDeviceAsync(new HotplugDevice("0000:0b:00.1", "edu") { VendorId = 0x1234, DeviceId = 0x11e8, ClassCode = 0x00ff00, Driver = "vfio-pci" });
            await source.Client.Admin.BindDriverAsync("0000:03:00.1", "snd_hda_intel");

            var file = Path.Combine(_directory, "topology.json");
            await using (var export = ClientProcess.StartDmactl(source.Address, "topology"))
            {
                Assert.Equal(0, await export.WaitForExitAsync(Timeout));
                Assert.Empty(export.Stderr);
                await File.WriteAllLinesAsync(file, export.Stdout);
            }

            var copy = await LiveBroker.StartAsync("--topology", file);
            await using (copy)
            {
                Assert.Equal(await DevicesAsync(source.Client), await DevicesAsync(copy.Client));
                Assert.Equal(await GroupsAsync(source.Client), await GroupsAsync(copy.Client));
            }
        }

        static async Task<string[]> DevicesAsync(BrokerClient client) =>
            [.. (await client.ListDevicesAsync()).Devices.Select(d => d.ToString())];

        static async Task<string[]> GroupsAsync(BrokerClient client) =>
            [.. (await client.ListGroupsAsync()).Groups.Select(g => $"{g.Id} {g.OwnerKind} {g.OwnerCount} {g.Domain} {string.Join(',', g.Devices)}")];
    }

    /// <summary>A loopback port nothing listens on (the OS gave it, then it was closed).</summary>
    private static int ClosedPort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }
}
