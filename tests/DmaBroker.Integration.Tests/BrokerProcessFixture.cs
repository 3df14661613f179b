using System.Diagnostics;
using System.Reflection;
using System.Threading.Channels;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Grpc.Core;
using Grpc.Health.V1;

// The tests run one at a time: they measure release latencies and lease expiry, and a 2-core CI
// machine running several classes' client processes at once would measure its own load instead.
[assembly: CollectionBehavior(DisableTestParallelization = true)]

namespace DmaBroker.Integration.Tests;

/// <summary>
/// A real broker in a process of its own (<c>dotnet DmaBroker.Server.dll</c>, from its build
/// output), on a loopback port the OS chose, for client processes to reach. Its thread pool is its
/// own: the test host's, in which the test platform parks workers in blocking calls, cannot delay
/// it past a short lease. Disposing it kills its process tree, whatever the test's outcome.
/// </summary>
public sealed class LiveBroker : IAsyncDisposable
{
    private const string ListeningOn = "Now listening on: ";
    private const string LiveViewOn = "live view on ";
    private static readonly TimeSpan StartupTimeout = TimeSpan.FromSeconds(30);

    /// <summary>The broker's assembly in its own output folder (the build writes its path into this assembly).</summary>
    public static readonly string AssemblyPath = typeof(LiveBroker).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>()
        .Single(a => a.Key == "BrokerAssemblyPath").Value!;

    private readonly ClientProcess _process;

    private LiveBroker(ClientProcess process, string address, string webAddress, BrokerClientOptions? clientOptions)
    {
        _process = process;
        _token = clientOptions?.BearerToken;
        Address = address;
        WebAddress = webAddress;
        Client = BrokerClient.Connect(address, clientOptions);
    }

    private readonly string? _token;

    public string Address { get; }

    /// <summary>The broker's process id (its shared-memory files carry it: /dev/shm/dmabroker-&lt;pid&gt;-…).</summary>
    public int Pid => _process.Pid;

    /// <summary>The <c>--http-listen</c> address: the live view and /metrics.</summary>
    public string WebAddress { get; }
    public BrokerClient Client { get; }

    /// <summary>The broker's live counts (sessions, containers, user-owned groups…).</summary>
    public async Task<BrokerStats> StatsAsync() =>
        await Client.Admin.GetStatsAsync().WaitAsync(GroupWatch.DefaultTimeout);

    /// <summary>Everything the broker printed so far, stdout and stderr (prefixed "stderr: ").</summary>
    public string Transcript => _process.Transcript;

    /// <summary>Waits for the broker to print a line containing <paramref name="text"/>.</summary>
    public Task<string> WaitForLineAsync(string text) => _process.WaitForLineAsync(text, StartupTimeout);

    /// <summary>Stops the broker as an operator would (SIGINT) and waits until it has exited and printed its last line.</summary>
    public async Task<int> StopAsync()
    {
        _process.Interrupt();
        return await _process.WaitForExitAsync(StartupTimeout);
    }

    /// <summary>Starts the broker with the given options and returns once it answers its health check.</summary>
    public static Task<LiveBroker> StartAsync(params string[] args) => StartAsync(new ProcessSetup(), quiet: true, clientOptions: null, args);

    /// <summary>
    /// Starts the broker with the given options; <see cref="Client"/> (and the health check)
    /// connect with <paramref name="clientOptions"/>, such as a bearer token when an auth file
    /// admits no anonymous caller.
    /// </summary>
    public static Task<LiveBroker> StartAsync(BrokerClientOptions? clientOptions, params string[] args) =>
        StartAsync(new ProcessSetup(), quiet: true, clientOptions, args);

    /// <summary>Starts the broker with the given environment and working directory.</summary>
    public static Task<LiveBroker> StartAsync(ProcessSetup setup, bool quiet, params string[] args) =>
        StartAsync(setup, quiet, clientOptions: null, args);

    /// <summary>
    /// Starts the broker and returns once it answers its health check. <paramref name="quiet"/>
    /// logs warnings and errors only (but for the lines that tell the addresses the OS gave: the
    /// lifetime's and the banner, which tells the web listener's); otherwise the broker logs at
    /// its default levels.
    /// </summary>
    private static async Task<LiveBroker> StartAsync(ProcessSetup setup, bool quiet, BrokerClientOptions? clientOptions, string[] args)
    {
        string[] levels = quiet
            ? ["--Logging:LogLevel:Default=Warning", "--Logging:LogLevel:Microsoft.Hosting.Lifetime=Information", "--Logging:LogLevel:DmaBroker.Server.Startup=Information"]
            : [];
        var process = ClientProcess.Start(setup, AssemblyPath, ["--listen", "http://127.0.0.1:0", "--http-listen", "http://127.0.0.1:0", .. levels, .. args]);
        LiveBroker? broker = null;
        try
        {
            var line = await process.WaitForLineAsync(ListeningOn, StartupTimeout);
            var address = After(ListeningOn, line).Trim();
            var web = After(LiveViewOn, await process.WaitForLineAsync(LiveViewOn, StartupTimeout));
            broker = new LiveBroker(process, address, web[..web.IndexOf(';', StringComparison.Ordinal)], clientOptions);
            await broker.WaitUntilServingAsync();
            return broker;
        }
        catch
        {
            if (broker is null)
                await process.DisposeAsync();
            else
                await broker.DisposeAsync();
            throw;
        }
    }

    // What follows a log line's marker, in a text line or a JSON one's message (--log-format json).
    private static string After(string marker, string line)
    {
        if (line.StartsWith('{'))
        {
            using var json = System.Text.Json.JsonDocument.Parse(line);
            line = json.RootElement.GetProperty("Message").GetString() ?? "";
        }
        return line[(line.IndexOf(marker, StringComparison.Ordinal) + marker.Length)..];
    }

    private async Task WaitUntilServingAsync()
    {
        // The channel itself carries no token; the client's own calls do.
        var headers = _token is null ? null : new Metadata { { "authorization", $"Bearer {_token}" } };
        var options = new CallOptions(headers, deadline: DateTime.UtcNow + StartupTimeout).WithWaitForReady();
        var health = await new Health.HealthClient(Client.Raw.Channel).CheckAsync(new HealthCheckRequest(), options).ResponseAsync.WaitAsync(StartupTimeout);
        Assert.True(health.Status == HealthCheckResponse.Types.ServingStatus.Serving, $"{_process.Name} answers {health.Status}:\n{_process.Transcript}");
    }

    /// <summary>SIGKILL: the broker dies at once, as on a crash; its clients see their connections drop.</summary>
    public void Kill() => _process.Kill();

    /// <summary>SIGSTOP: the broker freezes (a hung host, a long GC pause); <see cref="Thaw"/> lets it run on.</summary>
    public void Freeze() => _process.Stop();

    /// <summary>Waits until every thread of the broker is stopped, after <see cref="Freeze"/>.</summary>
    public Task WaitUntilFrozenAsync() => _process.WaitUntilStoppedAsync(StartupTimeout);

    /// <summary>SIGCONT after <see cref="Freeze"/>.</summary>
    public void Thaw() => _process.Continue();

    /// <summary>
    /// Kills the broker, then fails if it logged an error (the console logger's <c>fail:</c> and
    /// <c>crit:</c> lines, or their JSON form), as the server tests' <c>BrokerLog</c> does for a broker in the test host.
    /// </summary>
    public async ValueTask DisposeAsync()
    {
        Client.Dispose();
        await _process.DisposeAsync();
        var transcript = _process.Transcript;
        if (transcript.Split('\n').Any(line => line.StartsWith("fail: ", StringComparison.Ordinal) || line.StartsWith("crit: ", StringComparison.Ordinal)
            || line.Contains("\"LogLevel\":\"Error\"", StringComparison.Ordinal) || line.Contains("\"LogLevel\":\"Critical\"", StringComparison.Ordinal)))
            throw new Xunit.Sdk.XunitException($"the broker logged errors; any failure of the test itself is replaced by this one. It printed:\n{transcript}");
    }
}

/// <summary>
/// The groups as a watcher sees them: kept current from the snapshot and every change, each
/// change stamped with its arrival time, and every transition checked against SPEC §10 — a user
/// owner always names a session, and ownership never passes from one session to another without
/// a release in between (that would be two owners at once). Each wait is bounded.
/// </summary>
public sealed class GroupWatch : IAsyncDisposable
{
    public static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(30);

    private readonly CancellationTokenSource _cts = new();
    private readonly Channel<(long At, WatchEvent Event)> _arrivals = Channel.CreateUnbounded<(long, WatchEvent)>(new UnboundedChannelOptions { SingleReader = true, SingleWriter = true });
    private readonly Dictionary<uint, Group> _groups = [];
    private readonly Dictionary<uint, long> _changedAt = [];
    private readonly List<string> _violations = [];
    private readonly Dictionary<ulong, string> _ended = [];
    private readonly Task _pump;
    private ulong _revision;
    private bool _synced;

    private GroupWatch(BrokerClient client) => _pump = PumpAsync(client);

    /// <summary>The groups as of the last event applied.</summary>
    public IReadOnlyDictionary<uint, Group> Groups => _groups;

    /// <summary>Every broken rule seen so far, in order.</summary>
    public IReadOnlyList<string> Violations => _violations;

    /// <summary>Starts a watch and applies its snapshot.</summary>
    public static async Task<GroupWatch> StartAsync(BrokerClient client)
    {
        var watch = new GroupWatch(client);
        await watch.WaitUntilAsync("the snapshot", _ => watch._synced);
        return watch;
    }

    /// <summary>Applies events until <paramref name="condition"/> holds (at once if it already does); fails after the timeout.</summary>
    public async Task WaitUntilAsync(string what, Func<IReadOnlyDictionary<uint, Group>, bool> condition, TimeSpan? timeout = null)
    {
        var limit = timeout ?? DefaultTimeout;
        using var cts = new CancellationTokenSource(limit);
        try
        {
            while (!condition(_groups))
            {
                var (at, ev) = await _arrivals.Reader.ReadAsync(cts.Token);
                Apply(at, ev);
            }
        }
        catch (OperationCanceledException) when (cts.IsCancellationRequested)
        {
            throw new Xunit.Sdk.XunitException($"watch: {what} not seen within {limit}; groups now: {Describe()}");
        }
        catch (ChannelClosedException e)
        {
            throw new Xunit.Sdk.XunitException($"watch ended before {what}: {e.InnerException?.Message}; groups now: {Describe()}");
        }
    }

    /// <summary>Waits until the group's owner is of the given kind; returns the group as it is then.</summary>
    public async Task<Group> WaitForAsync(uint groupId, OwnerKind owner, TimeSpan? timeout = null)
    {
        await WaitUntilAsync($"group {groupId} {owner}", g => g.TryGetValue(groupId, out var group) && group.OwnerKind == owner, timeout);
        return _groups[groupId];
    }

    /// <summary>The <see cref="Stopwatch"/> timestamp at which the group's latest change arrived.</summary>
    public long ChangedAt(uint groupId) => _changedAt[groupId];

    /// <summary>The user-owned groups and their owning sessions.</summary>
    public IReadOnlyDictionary<uint, ulong> UserOwners() =>
        _groups.Values.Where(g => g.OwnerKind == OwnerKind.User).ToDictionary(g => g.Id, g => g.OwnerSession);

    public string Describe() => string.Join("; ", _groups.Values
        .Where(g => g.OwnerKind != OwnerKind.Kernel)
        .Select(g => $"{g.Id}:{g.OwnerKind}({g.OwnerSession}) count {g.OwnerCount} gen {g.Generation}"));

    private async Task PumpAsync(BrokerClient client)
    {
        try
        {
            await foreach (var ev in client.WatchAsync(_cts.Token))
                _arrivals.Writer.TryWrite((Stopwatch.GetTimestamp(), ev));
            _arrivals.Writer.TryComplete(new InvalidOperationException("the broker ended the watch"));
        }
        catch (OperationCanceledException) when (_cts.IsCancellationRequested)
        {
            _arrivals.Writer.TryComplete();
        }
        catch (Exception e)
        {
            _arrivals.Writer.TryComplete(e);
        }
    }

    private void Apply(long at, WatchEvent ev)
    {
        if (_synced && ev.Revision <= _revision)
            _violations.Add($"revision {ev.Revision} after {_revision}");
        _revision = ev.Revision;
        switch (ev.EventCase)
        {
            case WatchEvent.EventOneofCase.Snapshot:
                // Also a resynchronisation after an overflow: transitions in between are unknown.
                _groups.Clear();
                foreach (var g in ev.Snapshot.Groups)
                {
                    _groups[g.Id] = g;
                    _changedAt[g.Id] = at;
                }
                _synced = true;
                break;
            case WatchEvent.EventOneofCase.Group:
                var next = ev.Group;
                if (_groups.TryGetValue(next.Id, out var previous))
                    Check(previous, next);
                _groups[next.Id] = next;
                _changedAt[next.Id] = at;
                break;
            case WatchEvent.EventOneofCase.GroupRemoved:
                _groups.Remove(ev.GroupRemoved.GroupId);
                break;
            case WatchEvent.EventOneofCase.SessionEnded:
                _ended[ev.SessionEnded.SessionId] = ev.SessionEnded.Reason;
                break;
        }
    }

    private void Check(Group previous, Group next)
    {
        var at = $"rev {_revision} group {next.Id}";
        if (next.OwnerKind == OwnerKind.User)
        {
            if (next.OwnerSession == 0 || next.OwnerCount == 0)
                _violations.Add($"{at}: user-owned without an owner (session {next.OwnerSession}, count {next.OwnerCount})");
            if (previous.OwnerKind == OwnerKind.User && previous.OwnerSession != next.OwnerSession)
                _violations.Add($"{at}: passed from session {previous.OwnerSession} to {next.OwnerSession} without a release");
            if (previous.OwnerKind != OwnerKind.User && next.Generation <= previous.Generation)
                _violations.Add($"{at}: granted to session {next.OwnerSession} without a new generation ({previous.Generation} -> {next.Generation})");
            if (previous.OwnerKind == OwnerKind.Kernel)
                _violations.Add($"{at}: user-owned straight from kernel-owned");
        }
        else if (next.OwnerSession != 0)
        {
            _violations.Add($"{at}: {next.OwnerKind} but names session {next.OwnerSession}");
        }
    }

    /// <summary>Waits until a session has ended with everything it held released; returns the reason.</summary>
    public async Task<string> WaitForSessionEndedAsync(ulong sessionId)
    {
        await WaitUntilAsync($"session {sessionId} ended", _ => _ended.ContainsKey(sessionId));
        return _ended[sessionId];
    }

    public async ValueTask DisposeAsync()
    {
        await _cts.CancelAsync();
        await _pump;
        _cts.Dispose();
    }
}

/// <summary>The four edu devices of the default topology that are free for users, one per group, bound to vfio-pci.</summary>
public static class FreeEduDevices
{
    public static readonly IReadOnlyList<(string Address, uint Group)> All =
    [
        ("0000:08:00.0", 14),
        ("0000:09:00.0", 15),
        ("0000:0a:00.0", 16),
        ("0000:0b:00.0", 17),
    ];
}
