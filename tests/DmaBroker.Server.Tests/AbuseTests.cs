using System.Collections.Concurrent;
using System.Diagnostics;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Grpc.Core;
using Xunit.Abstractions;

namespace DmaBroker.Server.Tests;

/// <summary>
/// SPEC §12 under abuse: one principal hammering Session.Open is held to its session quota
/// (EMFILE) and its open rate (EAGAIN), and the broker keeps serving another principal within
/// its normal latency.
/// </summary>
[Collection(RunsAlone.Name)]
public sealed class AbuseTests(ITestOutputHelper output)
{
    private const string FloodToken = "flood-token";
    private const string SteadyToken = "steady-token";
    private const string PatientToken = "patient-token";
    private const string RootToken = "root-token";
    private const string FloodPrincipal = "token:flood";
    private const int SessionQuota = 4;
    private const int OpensPerSecond = 20;
    private const int Attempts = 10_000;
    private const int Parallelism = 32;
    private const string SteadyDevice = "0000:0b:00.0";
    private static readonly TimeSpan AttemptTimeout = TimeSpan.FromSeconds(5);

    private static readonly string Auth = $$"""
        {
          "principals": [
            { "name": "{{FloodPrincipal}}", "token_sha256": "{{SecureBroker.Sha256(FloodToken)}}", "roles": ["user"],
              "quotas": { "sessions": {{SessionQuota}}, "opens_per_second": {{OpensPerSecond}} } },
            { "name": "token:steady", "token_sha256": "{{SecureBroker.Sha256(SteadyToken)}}", "roles": ["user"],
              "quotas": { "opens_per_second": 1000000 } },
            { "name": "token:patient", "token_sha256": "{{SecureBroker.Sha256(PatientToken)}}", "roles": ["user"],
              "quotas": { "opens_per_second": 1 } },
            { "name": "token:root", "token_sha256": "{{SecureBroker.Sha256(RootToken)}}", "roles": ["admin"] }
          ]
        }
        """;

    // What an attempt may end in besides the broker's own answers: Kestrel's HTTP/2 rapid-reset
    // defence. Each refused Session.Open is a stream the server ended while the client's side was
    // still open; Kestrel tracks those for 5 s, refuses new streams on a connection tracking more
    // than 200 (ENHANCE_YOUR_CALM, which gRPC reads as RESOURCE_EXHAUSTED with no errno), and after
    // 100 such refusals closes the connection (UNAVAILABLE for the calls on it). It only ever hits
    // the connection that floods; see SessionOpen_RefusedRepeatedly_KeepsThePrincipalsLiveSession.
    private const string CalmDown = "ENHANCE_YOUR_CALM (Kestrel)";
    private const string ConnectionClosed = "UNAVAILABLE (connection closed)";

    [Fact]
    public async Task SessionOpen_TenThousandFromOnePrincipal_HeldToQuotaAndRate_OthersServedAtNormalLatency()
    {
        using var budget = new CancellationTokenSource(TimeSpan.FromSeconds(50));
        var ct = budget.Token;
        await using var broker = await SecureBroker.StartAsync(Auth);
        var root = broker.Connect(RootToken);
        var steady = broker.Connect(SteadyToken);
        var group = (await root.ListDevicesAsync(ct)).Devices.Single(d => d.Address == SteadyDevice).GroupId;
        await using var endings = await SessionEndings.StartAsync(root, ct);

        // The steady principal's normal latency, measured first (after one cycle to warm up).
        await ClaimCycleAsync(steady, group, ct);
        var baseline = new List<TimeSpan>();
        for (var i = 0; i < 25; i++)
            baseline.Add(await ClaimCycleAsync(steady, group, ct));

        var flood = new Flood(broker.Connect(FloodToken), root);
        var clock = Stopwatch.StartNew();
        var flooding = flood.RunAsync(ct);
        var underAttack = new List<TimeSpan>();
        while (!flooding.IsCompleted)
            underAttack.Add(await ClaimCycleAsync(steady, group, ct));
        await flooding;
        var elapsed = clock.Elapsed;

        var outcomes = flood.Outcomes.OrderBy(o => o.Key, StringComparer.Ordinal).ToList();
        var opened = flood.Outcomes.GetValueOrDefault(Flood.Opened);
        output.WriteLine($"flood: {Attempts} Session.Open attempts, {Parallelism} at a time, in {elapsed.TotalSeconds:F2} s ({Attempts / elapsed.TotalSeconds:F0} attempts/s)");
        output.WriteLine($"flood outcomes: {string.Join(", ", outcomes.Select(o => $"{o.Key} {o.Value}"))}");
        output.WriteLine($"flood: at most {flood.MostListed} of its sessions in ListSessions right after an open; quota {SessionQuota}, rate {OpensPerSecond}/s");
        output.WriteLine($"steady claim cycle, baseline ({baseline.Count}): {Describe(baseline)}");
        output.WriteLine($"steady claim cycle, under attack ({underAttack.Count}): {Describe(underAttack)}");

        // Every attempt ended one way: the broker's three answers all came, and nothing but them
        // and Kestrel's defence (no timeout, no INTERNAL, no other errno).
        Assert.Equal(Attempts, outcomes.Sum(o => o.Value));
        Assert.Subset(new HashSet<string> { Flood.Opened, Flood.Eagain, Flood.Emfile, CalmDown, ConnectionClosed }, flood.Outcomes.Keys.ToHashSet());
        Assert.Superset(new HashSet<string> { Flood.Opened, Flood.Eagain, Flood.Emfile }, flood.Outcomes.Keys.ToHashSet());
        // The rate: a bucket as deep as one second's opens, refilled at the rate, over the time the flood ran.
        Assert.True(opened <= OpensPerSecond + (OpensPerSecond * elapsed.TotalSeconds),
            $"{opened} sessions opened in {elapsed.TotalSeconds:F2} s at {OpensPerSecond} per second");
        // The quota, as the broker listed the principal's sessions right after each of its opens.
        Assert.InRange(flood.MostListed, 1, SessionQuota);
        // Nothing left behind once every session the flood opened has been wholly released.
        await Task.WhenAll(flood.OpenedIds.Select(endings.Of)).WaitAsync(AttemptTimeout, ct);
        var stats = await root.Admin.GetStatsAsync(ct);
        Assert.Equal((0u, 0u, 0u, 0ul), (stats.Sessions, stats.Containers, stats.UserOwnedGroups, stats.MemoryBytes));

        // Others served: every steady call succeeded (a failure throws), within a generous bound of their normal latency.
        Assert.NotEmpty(underAttack);
        var bound = (10 * Median(baseline)) + TimeSpan.FromMilliseconds(50);
        Assert.True(Median(underAttack) <= bound,
            $"median claim cycle under attack {Median(underAttack).TotalMilliseconds:F1} ms, more than {bound.TotalMilliseconds:F1} ms (baseline {Median(baseline).TotalMilliseconds:F1} ms)");
    }

    /// <summary>
    /// A principal at its open rate keeps what it already has, however often it is told EAGAIN:
    /// 300 refusals in a row on one connection. Kestrel's rapid-reset defence (see
    /// <see cref="CalmDown"/>) scales with the broker's streams per connection; at Kestrel's default
    /// of 100 it refused the connection's next streams from about the 200th refusal and then
    /// closed it, and the principal's live session ended with it.
    /// </summary>
    [Fact]
    public async Task SessionOpen_RefusedRepeatedly_KeepsThePrincipalsLiveSession()
    {
        using var budget = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        await using var broker = await SecureBroker.StartAsync(Auth);
        var patient = broker.Connect(PatientToken);
        await using var kept = await patient.OpenSessionAsync("kept", budget.Token);
        for (var i = 0; i < 300; i++)
        {
            var e = await Assert.ThrowsAnyAsync<BrokerException>(() => patient.OpenSessionAsync(cancellationToken: budget.Token));
            Assert.True((e.StatusCode, e.Errno) == (StatusCode.ResourceExhausted, Errno.EAGAIN), $"refusal {i + 1}: {e.StatusCode} {e.Reason}: {e.Message}");
        }
        Assert.False(kept.Ended.IsCompleted, "the principal's live session ended");
        await kept.NewContainerAsync(ContainerType.Type1V2, budget.Token);
    }

    /// <summary>Another principal's claim and release: open a session, create a container, claim the group, release it, close.</summary>
    private static async Task<TimeSpan> ClaimCycleAsync(BrokerClient client, uint group, CancellationToken ct)
    {
        var clock = Stopwatch.StartNew();
        await using (var session = await client.OpenSessionAsync("steady", ct))
        {
            var container = await session.NewContainerAsync(ContainerType.Type1V2, ct);
            var claim = await container.SetGroupAsync(group, ct);
            await claim.ReleaseAsync(ct);
        }
        return clock.Elapsed;
    }

    private static TimeSpan Median(List<TimeSpan> samples) => samples.Order().ElementAt(samples.Count / 2);

    private static string Describe(List<TimeSpan> samples)
    {
        var sorted = samples.Order().ToList();
        return $"median {Median(samples).TotalMilliseconds:F1} ms, p90 {sorted[sorted.Count * 9 / 10].TotalMilliseconds:F1} ms, max {sorted[^1].TotalMilliseconds:F1} ms";
    }

    /// <summary>
    /// <see cref="Attempts"/> Session.Open calls from one principal, <see cref="Parallelism"/> at a
    /// time, each bounded by <see cref="AttemptTimeout"/>. Sessions that open are held until at
    /// least the quota is held and an EMFILE comes back, then closed together: so EMFILE is certain,
    /// and after it the rate alone holds the principal back. After each open the broker's list of
    /// the principal's sessions is read, as an admin sees it.
    /// </summary>
    private sealed class Flood(BrokerClient client, BrokerClient admin)
    {
        public const string Opened = "opened";
        public static readonly string Eagain = $"{StatusCode.ResourceExhausted} {Errno.EAGAIN}";
        public static readonly string Emfile = $"{StatusCode.ResourceExhausted} {Errno.EMFILE}";

        private readonly Lock _sync = new();
        private readonly List<BrokerSession> _held = [];

        /// <summary>How many attempts ended each way: <see cref="Opened"/>, the status and errno, or Kestrel's refusals.</summary>
        public ConcurrentDictionary<string, int> Outcomes { get; } = new(StringComparer.Ordinal);

        /// <summary>The ids of every session the flood opened.</summary>
        public ConcurrentBag<ulong> OpenedIds { get; } = [];

        /// <summary>The most sessions of the principal that ListSessions showed right after one of its opens.</summary>
        public int MostListed { get; private set; }

        public async Task RunAsync(CancellationToken ct)
        {
            await Parallel.ForEachAsync(Enumerable.Range(0, Attempts), new ParallelOptions { MaxDegreeOfParallelism = Parallelism, CancellationToken = ct },
                async (_, token) => await AttemptAsync(token));
            await ReleaseAsync(0, ct);
        }

        private async Task AttemptAsync(CancellationToken ct)
        {
            using var attempt = CancellationTokenSource.CreateLinkedTokenSource(ct);
            attempt.CancelAfter(AttemptTimeout);
            string outcome;
            try
            {
                var session = await client.OpenSessionAsync(cancellationToken: attempt.Token);
                OpenedIds.Add(session.Id);
                lock (_sync)
                    _held.Add(session);
                var listed = (await admin.Admin.ListSessionsAsync(attempt.Token)).Count(s => s.Principal == FloodPrincipal);
                lock (_sync)
                    MostListed = Math.Max(MostListed, listed);
                outcome = Opened;
            }
            catch (Exception e) when (e is BrokerException or OperationCanceledException)
            {
                outcome = e switch
                {
                    BrokerException { StatusCode: StatusCode.ResourceExhausted, Errno: Errno.Unknown } b when b.Message.Contains("ENHANCE_YOUR_CALM", StringComparison.Ordinal) => CalmDown,
                    BrokerUnavailableException => ConnectionClosed,
                    BrokerException b => $"{b.StatusCode} {b.Reason}",
                    _ => $"no answer within {AttemptTimeout.TotalSeconds} s",
                };
            }
            Outcomes.AddOrUpdate(outcome, 1, (_, n) => n + 1);
            if (outcome == Emfile)
                await ReleaseAsync(SessionQuota, ct);
        }

        /// <summary>Closes every held session, if at least <paramref name="atLeast"/> are held.</summary>
        private async Task ReleaseAsync(int atLeast, CancellationToken ct)
        {
            BrokerSession[] sessions;
            lock (_sync)
            {
                if (_held.Count < atLeast)
                    return;
                sessions = [.. _held];
                _held.Clear();
            }
            await Task.WhenAll(sessions.Select(s => s.DisposeAsync().AsTask())).WaitAsync(AttemptTimeout, ct);
        }
    }

    /// <summary>
    /// Sessions wholly released, as the broker announces them on a topology watch
    /// (<c>session_ended</c> comes once everything a session held is gone), read as they come.
    /// </summary>
    private sealed class SessionEndings : IAsyncDisposable
    {
        private readonly ConcurrentDictionary<ulong, TaskCompletionSource> _ended = new();
        private readonly TaskCompletionSource _ready = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private readonly CancellationTokenSource _stop = new();
        private readonly Task _reader;

        private SessionEndings(BrokerClient client) => _reader = ReadAsync(client);

        /// <summary>Starts watching, and returns once the broker has sent the watch's first snapshot: every ending after it is seen.</summary>
        public static async Task<SessionEndings> StartAsync(BrokerClient client, CancellationToken ct)
        {
            var endings = new SessionEndings(client);
            await endings._ready.Task.WaitAsync(TestBroker.Timeout, ct);
            return endings;
        }

        /// <summary>Completes when the session has ended and everything it held is released.</summary>
        public Task Of(ulong sessionId) => Entry(sessionId).Task;

        private TaskCompletionSource Entry(ulong sessionId) =>
            _ended.GetOrAdd(sessionId, static _ => new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously));

        private async Task ReadAsync(BrokerClient client)
        {
            var snapshots = 0;
            try
            {
                await foreach (var ev in client.WatchAsync(_stop.Token))
                {
                    if (ev.SessionEnded is { } ended)
                        Entry(ended.SessionId).TrySetResult();
                    else if (ev.Snapshot is not null && ++snapshots == 1)
                        _ready.TrySetResult();
                    // A second snapshot means the watcher fell behind and events were skipped: say so rather than wait forever.
                    else if (ev.Snapshot is not null)
                        throw new InvalidOperationException("the watch was resynchronised; session endings may have been missed");
                }
            }
            catch (Exception e) when ((e is InvalidOperationException or BrokerException) && !_stop.IsCancellationRequested)
            {
                _ready.TrySetException(e);
                foreach (var entry in _ended.Values)
                    entry.TrySetException(e);
            }
            catch (Exception e) when ((e is OperationCanceledException or RpcException) && _stop.IsCancellationRequested)
            {
                // Disposed.
            }
        }

        public async ValueTask DisposeAsync()
        {
            await _stop.CancelAsync();
            await _reader.WaitAsync(TestBroker.Timeout);
            _stop.Dispose();
        }
    }
}
