using System.Text.Json;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Xunit.Abstractions;

namespace DmaBroker.Integration.Tests;

/// <summary>
/// SPEC §13 through the real executable: settings from flags, environment and appsettings.json in
/// that order, the JSON log format, and logs an operator can read at the default level — no stack
/// traces and a few lines per client operation, however the clients end.
/// </summary>
public sealed class LoggingTests(ITestOutputHelper output) : IDisposable
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);
    private readonly string _directory = Directory.CreateTempSubdirectory("dmabroker-logging-").FullName;

    public void Dispose() => Directory.Delete(_directory, recursive: true);

    [Fact]
    public async Task Start_SettingsInFileEnvironmentAndFlags_FlagThenEnvironmentThenFileWins()
    {
        await File.WriteAllTextAsync(Path.Combine(_directory, "appsettings.json"),
            """{ "DmaBroker": { "LeaseTtlMs": 1111, "MemoryLimitMb": 64, "DmaLimit": 77 } }""");
        var setup = new ProcessSetup
        {
            WorkingDirectory = _directory,
            Environment = new Dictionary<string, string?>
            {
                ["DMABROKER_LEASE_TTL_MS"] = "2222",
                ["DmaBroker__MemoryLimitMb"] = "1",
                // The clients' variables: the broker must neither obey nor refuse them.
                ["DMABROKER_TOKEN"] = "not-the-brokers",
                ["DMABROKER_ADDRESS"] = "http://127.0.0.1:1",
            },
        };
        await using var broker = await LiveBroker.StartAsync(setup, quiet: true, "--lease-ttl-ms", "3333");

        await using var session = await broker.Client.OpenSessionAsync("settings");
        var container = await session.NewContainerAsync(ContainerType.Iommufd);
        var info = await container.GetInfoAsync();
        var tooMuch = await Assert.ThrowsAsync<BrokerException>(() => session.AllocateAsync(2 * 1024 * 1024));

        // The flag over the environment over the file; the environment over the file; the file alone.
        Assert.Equal((3333.0, Errno.ENOMEM, 77u), (session.LeaseTtl.TotalMilliseconds, tooMuch.Errno, info.DmaAvail));
    }

    [Theory]
    [InlineData("DMABROKER_LEASE_TTL_MS", "5", "", "DMABROKER_LEASE_TTL_MS (environment) must be between 100 and 3600000, got 5")]
    [InlineData("DmaBroker__LogFormat", "xml", "", "DmaBroker__LogFormat (environment) takes text or json, got 'xml'")]
    [InlineData("DMABROKER_LISTEN", "http://127.0.0.1", "", "DMABROKER_LISTEN (environment): --listen 'http://127.0.0.1': give the port")]
    [InlineData(null, null, """{ "DmaBroker": { "LeaseTtlMs": "soon" } }""", "DmaBroker:LeaseTtlMs ({0}) takes a whole number, got 'soon'")]
    [InlineData("--log-format", "yaml", "", "--log-format takes text or json, got 'yaml'")]
    public async Task Start_BadValueInEnvironmentFileOrFlag_ExitsTwoWithOneLineNamingWhere(string? variable, string? value, string appsettings, string expected)
    {
        var file = Path.Combine(_directory, "appsettings.json");
        if (appsettings.Length > 0)
            await File.WriteAllTextAsync(file, appsettings);
        // The listen address comes from the environment too, so that a bad one there is not overridden by a flag.
        var environment = new Dictionary<string, string?> { ["DMABROKER_LISTEN"] = "http://127.0.0.1:0" };
        string[] args = [];
        if (variable?.StartsWith("--", StringComparison.Ordinal) == true)
            args = [.. args, variable, value!];
        else if (variable is not null)
            environment[variable] = value;

        await using var broker = ClientProcess.Start(new ProcessSetup { WorkingDirectory = _directory, Environment = environment }, LiveBroker.AssemblyPath, args);

        Assert.Equal(2, await broker.WaitForExitAsync(Timeout));
        var line = Assert.Single(broker.Transcript.Split('\n', StringSplitOptions.RemoveEmptyEntries));
        Assert.StartsWith($"stderr: dmabroker: {string.Format(System.Globalization.CultureInfo.InvariantCulture, expected, file)}", line, StringComparison.Ordinal);
    }

    [Fact]
    public async Task LogFormatJson_ClaimAndRelease_EveryLineIsOneJsonObjectWithBannerAndAuditEvents()
    {
        await using var broker = await LiveBroker.StartAsync(new ProcessSetup(), quiet: false, "--log-format", "json");
        await using (var session = await broker.Client.OpenSessionAsync("json"))
        {
            var container = await session.NewContainerAsync(ContainerType.Type1V2);
            await (await container.SetGroupAsync(FreeEduDevices.All[0].Group)).ReleaseAsync();
        }
        Assert.Equal(0, await broker.StopAsync());

        var lines = broker.Transcript.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        var events = lines.Select(line =>
        {
            Assert.False(line.StartsWith("stderr: ", StringComparison.Ordinal), $"the broker wrote to stderr: {line}");
            using var json = JsonDocument.Parse(line);
            return json.RootElement.Clone();
        }).ToList();
        Assert.All(events, e => Assert.Equal(["Timestamp", "EventId", "LogLevel", "Category", "Message"], e.EnumerateObject().Select(p => p.Name).Take(5)));

        var banner = Assert.Single(events, e => e.GetProperty("Category").GetString() == "DmaBroker.Server.Startup");
        Assert.Equal((1, 3000), (banner.GetProperty("EventId").GetInt32(), banner.GetProperty("State").GetProperty("LeaseTtlMs").GetInt32()));
        var audit = events.Where(e => e.GetProperty("Category").GetString() == "DmaBroker.Audit")
            .Select(e => (e.GetProperty("EventId").GetInt32(), e.GetProperty("State").GetProperty("Outcome").GetString(),
                e.GetProperty("State").GetProperty("GroupId").GetUInt32(), e.GetProperty("State").GetProperty("Generation").GetUInt64()));
        Assert.Equal([(1000, "ok", FreeEduDevices.All[0].Group, 1ul), (1001, "ok", FreeEduDevices.All[0].Group, 1ul)], audit);
    }

    /// <summary>
    /// The acceptance, scaled to a 2-core machine: dmactl runs (listing, holding a group
    /// until SIGKILL, a refused claim, a DMA round trip, driver bind and unbind, a refused revoke),
    /// sample drivers SIGKILLed mid-stream (Session.Open and Dma.Stream), and in-process sessions
    /// and watches whose connection is dropped mid-stream — against a broker at its default log
    /// levels. No stack trace, no error or warning, and a few lines per operation.
    /// </summary>
    [Fact]
    public async Task DefaultLogLevel_ClientOperationsIncludingKilledClients_FewLinesEachAndNoStackTrace()
    {
        await using var broker = await LiveBroker.StartAsync(new ProcessSetup(), quiet: false);
        await using var watch = await GroupWatch.StartAsync(broker.Client);
        var before = broker.Transcript.Split('\n').Length;
        var operations = 0;
        var (edu, eduGroup) = FreeEduDevices.All[0];

        string[][] commands =
        [
            ["groups"], ["stats"], ["hold", "9"], ["dma", FreeEduDevices.All[1].Address, "--bytes", "4096"],
            ["bind", "0000:07:00.0", "vfio-pci"], ["unbind", "0000:07:00.0"], ["revoke", "999"], ["sessions"],
        ];
        for (var round = 0; round < 2; round++)
        {
            foreach (var command in commands)
            {
                await using var dmactl = ClientProcess.StartDmactl(broker.Address, command);
                await dmactl.WaitForExitAsync(Timeout);
                operations++;
            }
            // Killed while holding a group: its connection dies under the Session.Open stream.
            await using (var holder = ClientProcess.StartDmactl(broker.Address, "hold", $"{eduGroup}"))
            {
                await holder.WaitForLineAsync($"holding group {eduGroup}", Timeout);
                holder.Kill();
                await watch.WaitForAsync(eduGroup, OwnerKind.None);
                operations++;
            }
            // Killed mid-stream: a Dma.Stream and the session stream die together.
            await using (var driver = ClientProcess.StartStreamingDriver(broker.Address, FreeEduDevices.All[2].Address))
            {
                await driver.WaitForLineAsync("ready: session", Timeout);
                await watch.WaitForAsync(FreeEduDevices.All[2].Group, OwnerKind.User);
                driver.Kill();
                await watch.WaitForAsync(FreeEduDevices.All[2].Group, OwnerKind.None);
                operations++;
            }
        }
        for (var i = 0; i < 10; i++)
        {
            await DropMidStreamAsync(broker.Address, edu, eduGroup);
            await watch.WaitForAsync(eduGroup, OwnerKind.None);
            operations++;
            await DropWatchAsync(broker.Address);
            operations++;
        }
        Assert.Equal(0, await broker.StopAsync());

        var lines = broker.Transcript.Split('\n')[before..];
        output.WriteLine($"{operations} operations, {lines.Length} broker lines ({(double)lines.Length / operations:F2} per operation), including shutdown:");
        output.WriteLine(string.Join('\n', lines));
        Assert.DoesNotContain(lines, l => l.Contains("   at ", StringComparison.Ordinal) || l.Contains("Exception", StringComparison.Ordinal));
        Assert.DoesNotContain(lines, l => l.StartsWith("fail:", StringComparison.Ordinal) || l.StartsWith("crit:", StringComparison.Ordinal) || l.StartsWith("warn:", StringComparison.Ordinal));
        // A session's open, claim, release and end at most, and one line per refusal or admin action.
        Assert.True(lines.Length <= 4 * operations, $"{lines.Length} lines for {operations} operations");
    }

    // A session that claims a group and streams DMA, then loses its connection without closing anything.
    private static async Task DropMidStreamAsync(string address, string device, uint group)
    {
        var client = BrokerClient.Connect(address);
        var session = await client.OpenSessionAsync("dropped");
        var container = await session.NewContainerAsync(ContainerType.Type1V2);
        await container.SetGroupAsync(group);
        var handle = await session.OpenDeviceAsync(device);
        var dma = await handle.OpenDmaChannelAsync();
        (await dma.MmioReadAsync(0, 0)).EnsureOk();
        client.Dispose();
        await IgnoreGoneAsync(dma.DisposeAsync);
        await IgnoreGoneAsync(session.DisposeAsync);
    }

    // A watcher whose connection is dropped while the broker streams to it.
    private static async Task DropWatchAsync(string address)
    {
        var client = BrokerClient.Connect(address);
        var events = client.WatchAsync().GetAsyncEnumerator();
        Assert.True(await events.MoveNextAsync());
        client.Dispose();
        await IgnoreGoneAsync(events.DisposeAsync);
    }

    private static async Task IgnoreGoneAsync(Func<ValueTask> dispose)
    {
        try
        {
            await dispose().AsTask().WaitAsync(Timeout);
        }
        catch (Exception e) when (e is BrokerException or Grpc.Core.RpcException or ObjectDisposedException or OperationCanceledException or InvalidOperationException)
        {
            // The connection is gone on purpose.
        }
    }
}
