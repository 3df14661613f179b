using System.Collections;
using DmaBroker.Server.Hosting;
using Microsoft.AspNetCore.Builder;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace DmaBroker.Server.Tests;

/// <summary>
/// SPEC §13's settings: flags over environment over appsettings.json. Each test builds the host
/// in-process with its own environment and content root, so tests running side by side never
/// share the process's environment or working directory.
/// </summary>
public sealed class SettingsTests : IDisposable
{
    private readonly string _root = Directory.CreateTempSubdirectory("dmabroker-settings-").FullName;

    public void Dispose() => Directory.Delete(_root, recursive: true);

    [Theory]
    // appsettings.json, DmaBroker__LeaseTtlMs, DMABROKER_LEASE_TTL_MS, --lease-ttl-ms -> in force
    [InlineData(null, null, null, null, 3000)]
    [InlineData(1111, null, null, null, 1111)]
    [InlineData(1111, 2222, null, null, 2222)]
    [InlineData(1111, null, 3333, null, 3333)]
    [InlineData(1111, 2222, 3333, null, 3333)]
    [InlineData(1111, 2222, 3333, 4444, 4444)]
    [InlineData(null, null, null, 4444, 4444)]
    public async Task Build_SettingFromSeveralSources_StrongestWins(int? appsettings, int? settingVariable, int? optionVariable, int? flag, int expected)
    {
        if (appsettings is { } json)
            WriteAppsettings($$"""{ "DmaBroker": { "LeaseTtlMs": {{json}} } }""");
        var environment = new Hashtable();
        if (settingVariable is { } setting)
            environment["DmaBroker__LeaseTtlMs"] = $"{setting}";
        if (optionVariable is { } option)
            environment["DMABROKER_LEASE_TTL_MS"] = $"{option}";
        string[] args = flag is { } f ? ["--lease-ttl-ms", $"{f}"] : [];

        var options = await OptionsAsync(environment, args);

        Assert.Equal(expected, options.LeaseTtlMs);
    }

    [Fact]
    public async Task Build_EveryOptionAsAVariable_TakenAsItsSetting()
    {
        var environment = new Hashtable
        {
            ["DMABROKER_LISTEN"] = "http://127.0.0.1:0, unix:///tmp/dmabroker-settings.sock",
            ["DMABROKER_UNIX_SOCKET_MODE"] = "0600",
            ["DMABROKER_KEEPALIVE_MS"] = "1700",
            ["DMABROKER_WATCH_BUFFER"] = "64",
            ["DMABROKER_MEMORY_LIMIT_MB"] = "32",
            ["DMABROKER_DMA_LIMIT"] = "99",
            ["DMABROKER_LOG_FORMAT"] = "json",
            ["DMABROKER_INSECURE"] = "true",
            ["DMABROKER_MAX_STREAMS_PER_CONNECTION"] = "2048",
        };

        var o = await OptionsAsync(environment, []);
        Assert.Equal(2048, o.MaxStreamsPerConnection);

        Assert.Equal(["http://127.0.0.1:0", "unix:///tmp/dmabroker-settings.sock"], o.Listen);
        Assert.Equal(("0600", 1700, 64, 32, 99, "json", true), (o.UnixSocketMode, o.KeepAlivePingMs, o.WatchBuffer, o.MemoryLimitMb, o.DmaLimit, o.LogFormat, o.Insecure));
    }

    [Fact]
    public async Task Build_ListenFromSeveralSources_StrongestListReplacesTheOthersWhole()
    {
        WriteAppsettings("""{ "DmaBroker": { "Listen": [ "http://127.0.0.1:0", "http://127.0.0.1:0", "http://127.0.0.1:0" ] } }""");

        Assert.Equal(3, (await OptionsAsync(new Hashtable(), [])).Listen.Length);
        // Two addresses from the environment replace the file's three; they do not merge item by item.
        var environment = new Hashtable { ["DMABROKER_LISTEN"] = "http://[::1]:0 http://127.0.0.1:0" };
        Assert.Equal(["http://[::1]:0", "http://127.0.0.1:0"], (await OptionsAsync(environment, [])).Listen);
        Assert.Equal(["http://127.0.0.1:0"], (await OptionsAsync(environment, ["--listen", "http://127.0.0.1:0"])).Listen);
    }

    [Fact]
    public async Task Start_ClientVariablesSet_IgnoredWithoutAWord()
    {
        var log = await StartAndStopAsync(new Hashtable { ["DMABROKER_TOKEN"] = "secret", ["DMABROKER_ADDRESS"] = "http://127.0.0.1:1" });

        Assert.DoesNotContain(log.Records, r => r.Level >= LogLevel.Warning);
    }

    [Theory]
    [InlineData("DMABROKER_LEASE_TTL_MS", "5", "DMABROKER_LEASE_TTL_MS (environment) must be between 100 and 3600000, got 5")]
    [InlineData("DMABROKER_LEASE_TTL_MS", "soon", "DMABROKER_LEASE_TTL_MS (environment) takes a whole number, got 'soon'")]
    [InlineData("DmaBroker__DmaLimit", "0", "DmaBroker__DmaLimit (environment) must be between 1 and 1000000, got 0")]
    [InlineData("DMABROKER_KEEPALIVE_MS", "500", "DMABROKER_KEEPALIVE_MS (environment) must be between 1000 and 3600000, got 500")]
    [InlineData("DMABROKER_MAX_STREAMS_PER_CONNECTION", "0", "DMABROKER_MAX_STREAMS_PER_CONNECTION (environment) must be between 1 and 1000000, got 0")]
    [InlineData("DMABROKER_DEVICE_NICE", "20", "DMABROKER_DEVICE_NICE (environment) must be between 0 and 19, got 20")]
    [InlineData("DMABROKER_INSECURE", "maybe", "DMABROKER_INSECURE (environment) takes true or false, got 'maybe'")]
    [InlineData("DMABROKER_LOG_FORMAT", "xml", "DMABROKER_LOG_FORMAT (environment) takes text or json, got 'xml'")]
    [InlineData("DMABROKER_UNIX_SOCKET_MODE", "rw", "DMABROKER_UNIX_SOCKET_MODE (environment) takes an octal mode such as 0660, got 'rw'")]
    [InlineData("DMABROKER_LISTEN", "ftp://x", "DMABROKER_LISTEN (environment): --listen takes an address")]
    [InlineData("DmaBroker__Bogus", "1", "DmaBroker__Bogus (environment): the broker has no setting DmaBroker:Bogus")]
    public void Build_BadValueInEnvironment_OneLineNamingTheVariable(string variable, string value, string expected)
    {
        var e = Assert.Throws<ArgumentException>(() => BuildWith(new Hashtable { [variable] = value }, []));

        Assert.StartsWith(expected, e.Message, StringComparison.Ordinal);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void Build_BadValueInAppsettings_OneLineNamingTheFileAndSetting()
    {
        WriteAppsettings("""{ "DmaBroker": { "KeepAlivePingMs": 20 } }""");

        var e = Assert.Throws<ArgumentException>(() => BuildWith(new Hashtable(), []));

        Assert.Equal($"DmaBroker:KeepAlivePingMs ({Path.Combine(_root, "appsettings.json")}) must be between 1000 and 3600000, got 20", e.Message);
    }

    [Fact]
    public void Build_BadFlagOverridesGoodEnvironment_TheFlagIsNamed()
    {
        var e = Assert.Throws<ArgumentException>(() => BuildWith(new Hashtable { ["DMABROKER_WATCH_BUFFER"] = "10" }, ["--watch-buffer", "0"]));

        Assert.Equal("--watch-buffer must be between 1 and 1000000, got 0", e.Message);
    }

    [Fact]
    public async Task Start_UnknownBrokerVariable_StartsAndWarnsOnce()
    {
        var log = await StartAndStopAsync(new Hashtable { ["DMABROKER_LEASE_TTL"] = "5000" });

        var warning = Assert.Single(log.Records, r => r.Level >= LogLevel.Warning);
        Assert.Equal(("VariableIgnored", "DMABROKER_LEASE_TTL"), (warning.EventId.Name, warning.Fields["Variable"]));
    }

    private async Task<BrokerLog> StartAndStopAsync(Hashtable environment)
    {
        var log = new BrokerLog();
        var app = BrokerHost.Build(["--listen", "http://127.0.0.1:0"], environment, _root, services => services.AddLogging(logging => logging.AddProvider(log)));
        await using (app)
        {
            await app.StartAsync().WaitAsync(TestBroker.Timeout);
            await app.StopAsync().WaitAsync(TestBroker.Timeout);
        }
        return log;
    }

    private void WriteAppsettings(string json) => File.WriteAllText(Path.Combine(_root, "appsettings.json"), json);

    private WebApplication BuildWith(Hashtable environment, string[] args) =>
        BrokerHost.Build(["--Logging:LogLevel:Default=Warning", .. args], environment, _root, null);

    // The options in force, with listen addresses that never collide with another test's.
    private async Task<BrokerHostOptions> OptionsAsync(Hashtable environment, string[] args)
    {
        if (!environment.ContainsKey("DMABROKER_LISTEN") && !args.Contains("--listen") && !File.Exists(Path.Combine(_root, "appsettings.json")))
            args = ["--listen", "http://127.0.0.1:0", .. args];
        var app = BuildWith(environment, args);
        await using (app)
            return app.Services.GetRequiredService<BrokerHostOptions>();
    }
}
