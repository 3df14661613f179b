using System.Globalization;
using DmaBroker.Core.Topology;
using DmaBroker.Protocol;
using DmaBroker.Protocol.V1;
using Google.Protobuf;
using Google.Rpc;
using Grpc.Core;
using Xunit.Abstractions;

namespace DmaBroker.Server.Tests;

/// <summary>
/// A seeded fuzzer over every RPC and both streams, through a real listener with an auth file:
/// random, boundary and malformed fields, wrong and other principals' tokens, other sessions'
/// ids, garbage bytes and cancelled streams, mixed with valid calls that reach deep states
/// (claimed groups, mappings, open devices, DMA). It asserts that no call ends INTERNAL or
/// UNKNOWN, that every error carries ErrorInfo with an errno, that a rejected unary call changes
/// nothing (the journal revision and every live count before and after), that SPEC §10's
/// ownership invariants hold after every batch, and that every count returns to zero at the end.
/// A failure names the seed; <c>DMABROKER_FUZZ_SEED=N</c> replays it, <c>DMABROKER_FUZZ_CALLS</c>
/// sets the number of calls (default 100,000).
/// </summary>
[Collection(RunsAlone.Name)]
public sealed class WireFuzzTests(ITestOutputHelper output)
{
    private const string SeedVariable = "DMABROKER_FUZZ_SEED";
    private const string CallsVariable = "DMABROKER_FUZZ_CALLS";

    [Fact]
    public async Task EveryRpc_RandomMalformedAndHostileCalls_NoInternalErrnoOnEveryErrorNothingChangedByRejection()
    {
        var seed = Environment.GetEnvironmentVariable(SeedVariable) is { Length: > 0 } fixedSeed
            ? int.Parse(fixedSeed, CultureInfo.InvariantCulture)
            : Random.Shared.Next();
        var calls = Environment.GetEnvironmentVariable(CallsVariable) is { Length: > 0 } n
            ? int.Parse(n, CultureInfo.InvariantCulture)
            : 100_000;
        output.WriteLine($"seed {seed} (replay with {SeedVariable}={seed}), {calls} calls");
        await using var broker = await SecureBroker.StartAsync(WireFuzzer.AuthFile, "--lease-ttl-ms", "600000");
        await using var fuzzer = new WireFuzzer(seed, broker);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        try
        {
            await fuzzer.RunAsync(calls);
        }
        finally
        {
            output.WriteLine(fuzzer.Report(clock.Elapsed));
        }
        Assert.True(fuzzer.Calls >= calls, $"seed {seed}: only {fuzzer.Calls} calls made");
    }
}

/// <summary>The fuzzer: pools of ids it has seen, weighted random operations, and the checks after each.</summary>
internal sealed class WireFuzzer : IAsyncDisposable
{
    private const string Alice = "fuzz-alice";
    private const string Bob = "fuzz-bob";
    private const string Root = "fuzz-root";

    public static readonly string AuthFile = $$"""
        {
          "principals": [
            { "name": "token:alice", "token_sha256": "{{SecureBroker.Sha256(Alice)}}", "roles": ["user"],
              "quotas": { "sessions": 6, "memory_mb": 16, "containers": 8, "mappings": 64, "dma_streams": 4, "opens_per_second": 1000000 } },
            { "name": "token:bob", "token_sha256": "{{SecureBroker.Sha256(Bob)}}", "roles": ["user"],
              "groups": ["0000:0[ab]:*"], "quotas": { "sessions": 4, "memory_mb": 8, "opens_per_second": 1000000 } },
            { "name": "token:root", "token_sha256": "{{SecureBroker.Sha256(Root)}}", "roles": ["admin"],
              "quotas": { "opens_per_second": 1000000 } },
            { "name": "anonymous", "roles": ["viewer"] }
          ]
        }
        """;

    private static readonly string[] Tokens = [Alice, Bob, Root];
    private static readonly Marshaller<byte[]> Bytes = Marshallers.Create(b => b, b => b);
    private static readonly TimeSpan CallTimeout = TimeSpan.FromSeconds(30);

    private static readonly string[] UnaryMethods =
    [
        .. new[] { Topology.Descriptor, Kernel.Descriptor, Vfio.Descriptor, Memory.Descriptor }
            .SelectMany(s => s.Methods.Where(m => !m.IsClientStreaming && !m.IsServerStreaming).Select(m => $"{s.FullName}/{m.Name}")),
    ];

    private readonly Random _rng;
    private readonly SecureBroker _broker;
    private Grpc.Net.Client.GrpcChannel _channel = null!;
    private CallInvoker _invoker = null!;
    private Topology.TopologyClient _topology = null!;
    private Kernel.KernelClient _kernel = null!;
    private Vfio.VfioClient _vfio = null!;
    private Memory.MemoryClient _memory = null!;
    private readonly List<FuzzSession> _sessions = [];
    private readonly List<string> _deadTokens = [];
    private readonly List<ulong> _containers = [1];
    private readonly List<ulong> _handles = [1];
    private readonly List<ulong> _vaddrs = [0x1000];
    private readonly List<ulong> _iovas = [0x10_0000];
    private readonly Dictionary<string, int> _outcomes = [];
    private readonly string[] _addresses;
    private readonly uint[] _groupIds;
    private readonly TopologyWatcher _journalWatcher;
    private readonly IAsyncEnumerator<TopologyEvent> _journal;

    public WireFuzzer(int seed, SecureBroker broker)
    {
        _rng = new Random(seed);
        Seed = seed;
        _broker = broker;
        Reconnect();
        var snapshot = broker.Broker.Journal.Current;
        _addresses = [.. snapshot.Devices.Keys.Select(a => a.ToString())];
        _groupIds = [.. snapshot.Groups.Keys];
        _journalWatcher = broker.Broker.Journal.Watch();
        _journal = _journalWatcher.ReadAllAsync().GetAsyncEnumerator();
    }

    public int Seed { get; }

    /// <summary>A fresh connection for unary calls now and then (see <see cref="CancellingInvoker"/> for why).</summary>
    private void Reconnect()
    {
        _channel?.Dispose();
        _channel = _broker.Connect().Raw.Channel;
        _invoker = _channel.CreateCallInvoker();
        _topology = new(_invoker);
        _kernel = new(_invoker);
        _vfio = new(_invoker);
        _memory = new(_invoker);
    }

    /// <summary>RPC invocations made (unary calls and streams opened).</summary>
    public int Calls { get; private set; }

    /// <summary>Messages sent on streams besides the calls that opened them.</summary>
    public int StreamMessages { get; private set; }

    public async Task RunAsync(int calls)
    {
        while (Calls < calls)
        {
            await StepAsync();
            if (Calls % 500 == 0)
                CheckInvariants();
        }
        // The end: every session closes, and the broker holds nothing any more.
        foreach (var s in _sessions.ToArray())
            await EndAsync(s);
        CheckInvariants();
        var stats = _broker.Broker.GetStats();
        Assert.True(stats is { Sessions: 0, Containers: 0, UserOwnedGroups: 0, MemoryBytes: 0, OpenDevices: 0, DmaStreams: 0, Mappings: 0 },
            $"seed {Seed}: the broker still holds something after every session ended: {stats}");
    }

    public string Report(TimeSpan elapsed)
    {
        var byCode = _outcomes.OrderByDescending(kv => kv.Value).Select(kv => $"  {kv.Key,-40} {kv.Value,8}");
        var byKind = string.Join(", ", _time.OrderByDescending(kv => kv.Value).Select(kv => $"{kv.Key} {kv.Value.TotalSeconds:F1} s"));
        return $"{Calls} calls and {StreamMessages} stream messages in {elapsed.TotalSeconds:F1} s ({Calls / elapsed.TotalSeconds:F0} calls/s); time by kind: {byKind}; slowest step: {_slowest.Kind} {_slowest.Took.TotalMilliseconds:F0} ms; slowest unary call: {_slowestCall.Name} {_slowestCall.Took.TotalMilliseconds:F0} ms; outcomes:\n{string.Join('\n', byCode)}";
    }

    private async Task StepAsync()
    {
        var started = System.Diagnostics.Stopwatch.GetTimestamp();
        var roll = _rng.Next(1000);
        await StepAsync(roll);
        var took = System.Diagnostics.Stopwatch.GetElapsedTime(started);
        var kind = roll switch { < 30 => "open", < 40 => "end", < 55 => "garbage", < 85 => "dma", < 90 => "hostile-open", < 93 => "watch", < 150 => "kernel", < 200 => "topology", < 330 => "memory", _ => "vfio" };
        _time[kind] = _time.GetValueOrDefault(kind) + took;
        if (took > _slowest.Took)
            _slowest = (kind, took);
    }

    private readonly Dictionary<string, TimeSpan> _time = [];
    private (string Kind, TimeSpan Took) _slowest;
    private (string Name, TimeSpan Took) _slowestCall;

    private async Task StepAsync(int roll)
    {
        switch (roll)
        {
            case < 30:
                await OpenSessionAsync();
                break;
            case < 40:
                if (_sessions.Count > 0)
                    await EndAsync(Pick(_sessions));
                break;
            case < 55:
                await GarbageUnaryAsync();
                break;
            case < 85:
                await DmaStreamAsync();
                break;
            case < 90:
                await HostileSessionOpenAsync();
                break;
            case < 93:
                await WatchAsync();
                break;
            case < 150:
                await KernelAsync();
                break;
            case < 200:
                await TopologyAsync();
                break;
            case < 330:
                await MemoryAsync();
                break;
            default:
                await VfioAsync();
                break;
        }
    }

    // ---- credentials and arguments ----

    private sealed class FuzzSession(string bearer, ulong id, string token, AsyncDuplexStreamingCall<SessionRequest, SessionEvent> call, Task drain, Grpc.Net.Client.GrpcChannel channel)
    {
        /// <summary>Each session on a connection of its own, so one's resets never count against another's.</summary>
        public Grpc.Net.Client.GrpcChannel Channel { get; } = channel;
        public string Bearer { get; } = bearer;
        public ulong Id { get; } = id;
        public string Token { get; } = token;
        public AsyncDuplexStreamingCall<SessionRequest, SessionEvent> Call { get; } = call;
        public Task Drain { get; } = drain;
    }

    private T Pick<T>(IReadOnlyList<T> items) => items[_rng.Next(items.Count)];

    /// <summary>Mostly a live session's credentials, else a mismatch, a dead or garbage token, or nothing.</summary>
    private Metadata Headers(out FuzzSession? session)
    {
        session = _sessions.Count > 0 ? Pick(_sessions) : null;
        var headers = new Metadata();
        var roll = _rng.Next(100);
        var bearer = roll switch
        {
            < 80 when session is not null => session.Bearer,
            < 88 => Pick(Tokens),
            < 93 => "not-a-token",
            _ => null,
        };
        if (bearer is not null)
            headers.Add("authorization", $"Bearer {bearer}");
        var token = _rng.Next(100) switch
        {
            < 85 when session is not null => session.Token,
            < 90 when _deadTokens.Count > 0 => Pick(_deadTokens),
            < 95 => "garbage-token",
            _ => null,
        };
        if (token is not null)
            headers.Add(WireConstants.SessionTokenHeader, token);
        return headers;
    }

    private static Metadata AdminHeaders(string bearer) => new() { { "authorization", $"Bearer {bearer}" } };

    private string Address() => _rng.Next(100) switch
    {
        < 75 => Pick(_addresses),
        < 82 => "0000:ff:1f.7",
        < 87 => "08:00.0",
        < 92 => Pick(["", "0000:08:00.8", "zzzz:08:00.0", "0000:08:20.0", "0000:08:00.0 "]),
        < 97 => new string('0', _rng.Next(13, 200)),
        _ => new string('A', _rng.Next(10_000, 200_000)),
    };

    private uint GroupId() => _rng.Next(100) < 85 ? Pick(_groupIds) : Pick([uint.MaxValue, 999u, (uint)_rng.Next()]);

    private ulong Id(List<ulong> pool) => _rng.Next(100) switch
    {
        < 80 => Pick(pool),
        < 90 => 0,
        < 95 => ulong.MaxValue,
        _ => (ulong)_rng.NextInt64(),
    };

    private ulong Size() => _rng.Next(100) switch
    {
        < 30 => WireConstants.PageSize,
        < 45 => 2 * WireConstants.PageSize,
        < 55 => (ulong)_rng.Next(1, 9000),
        < 60 => 0,
        < 65 => 4UL << 20,
        < 68 => (4UL << 20) + 1,
        < 72 => ulong.MaxValue,
        < 76 => 64UL << 20,
        _ => (ulong)_rng.Next(1, 4) * WireConstants.PageSize,
    };

    private ulong Iova() => _rng.Next(100) switch
    {
        < 60 => Pick(_iovas),
        < 70 => 0xfee0_0000,
        < 75 => 1UL << 48,
        < 80 => ulong.MaxValue - 4095,
        < 85 => (ulong)_rng.Next(1, 4096),
        _ => (ulong)_rng.Next(1, 1 << 20) * WireConstants.PageSize,
    };

    private ByteString Data(int max = 9000) => _rng.Next(100) < 3
        ? ByteString.CopyFrom(new byte[(4 << 20) + _rng.Next(0, 2)])
        : ByteString.CopyFrom(Enumerable.Range(0, _rng.Next(0, max)).Select(i => (byte)i).ToArray());

    // ---- the operations ----

    private async Task OpenSessionAsync()
    {
        var bearer = Pick(Tokens);
        Calls++;
        var channel = _broker.Connect().Raw.Channel;
        var call = new Session.SessionClient(channel).Open(AdminHeaders(bearer), cancellationToken: CancellationToken.None);
        try
        {
            await TryWriteAsync(call.RequestStream, new SessionRequest { Hello = new Hello { ClientName = $"fuzz-{Calls}" } });
            if (!await call.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(CallTimeout) || call.ResponseStream.Current.Opened is not { } opened)
                throw new Xunit.Sdk.XunitException($"seed {Seed}: Session.Open answered without `opened`");
            var drain = DrainAsync(call);
            _sessions.Add(new FuzzSession(bearer, opened.SessionId, opened.Token, call, drain, channel));
            Record(null);
        }
        catch (RpcException e)
        {
            Check("Session.Open", e);
            call.Dispose();
            channel.Dispose();
        }
    }

    private static async Task DrainAsync(AsyncDuplexStreamingCall<SessionRequest, SessionEvent> call)
    {
        try
        {
            while (await call.ResponseStream.MoveNext(CancellationToken.None))
            {
            }
        }
        catch (RpcException)
        {
            // Revoked, or the fuzzer cancelled it.
        }
    }

    /// <summary>Ends a session gracefully and waits until the broker has released all it held.</summary>
    private async Task EndAsync(FuzzSession s)
    {
        _sessions.Remove(s);
        _deadTokens.Add(s.Token);
        try
        {
            await s.Call.RequestStream.CompleteAsync().WaitAsync(CallTimeout);
        }
        catch (Exception e) when (e is RpcException or InvalidOperationException)
        {
            // Already ended (revoked); the drain below returns at once.
        }
        await s.Drain.WaitAsync(CallTimeout);
        s.Call.Dispose();
        s.Channel.Dispose();
    }

    /// <summary>
    /// Calls the fuzzer cancels go on a channel of their own, replaced every few dozen: Kestrel
    /// answers a connection that resets streams in bulk with ENHANCE_YOUR_CALM (its rapid-reset
    /// defence), which is the transport protecting itself, not a broker error.
    /// </summary>
    private CallInvoker CancellingInvoker()
    {
        if (_cancellingChannel is null || ++_cancellingUses % 32 == 0)
        {
            _cancellingChannel?.Dispose();
            _cancellingChannel = _broker.Connect().Raw.Channel;
        }
        return _cancellingChannel.CreateCallInvoker();
    }

    private Grpc.Net.Client.GrpcChannel? _cancellingChannel;
    private int _cancellingUses;

    private async Task HostileSessionOpenAsync()
    {
        Calls++;
        var method = new Method<byte[], byte[]>(MethodType.DuplexStreaming, "dmabroker.v1.Session", "Open", Bytes, Bytes);
        using var cts = new CancellationTokenSource();
        var headers = _rng.Next(2) == 0 ? AdminHeaders(Pick(Tokens)) : [];
        using var call = CancellingInvoker().AsyncDuplexStreamingCall(method, null, new CallOptions(headers, cancellationToken: cts.Token));
        try
        {
            if (_rng.Next(2) == 0)
            {
                // Random bytes may happen to parse (unknown fields are skipped): then the session
                // lives on until the request stream completes, which ends it gracefully.
                if (await TryWriteAsync(call.RequestStream, Garbage()))
                    StreamMessages++;
                await TryCompleteAsync(call.RequestStream);
                while (await call.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(CallTimeout))
                {
                }
                Record(null);
            }
            else
            {
                // Opened, then cancelled without a word: the session must still be released. The
                // first answer is awaited, so the session exists (or was refused) before the cancel.
                if (await call.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(CallTimeout))
                    StreamMessages++;
                await cts.CancelAsync();
                await call.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(CallTimeout);
            }
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.Cancelled && cts.IsCancellationRequested)
        {
            Record(null);
        }
        catch (RpcException e)
        {
            Check("Session.Open garbage", e);
        }
        catch (InvalidOperationException) when (cts.IsCancellationRequested)
        {
            Record(null);
        }
        // Either way its teardown completes in the background; wait for it, so the next
        // rejected call's before-and-after snapshot sees no session end in between.
        await WaitQuietAsync();
    }

    private async Task WatchAsync()
    {
        Calls++;
        using var cts = new CancellationTokenSource();
        var headers = _rng.Next(3) == 0 ? new Metadata { { "authorization", "Bearer nope" } } : AdminHeaders(Pick(Tokens));
        using var call = new Topology.TopologyClient(CancellingInvoker()).Watch(new WatchRequest(), headers, cancellationToken: cts.Token);
        try
        {
            if (await call.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(CallTimeout))
                Assert.Equal(WatchEvent.EventOneofCase.Snapshot, call.ResponseStream.Current.EventCase);
            Record(null);
        }
        catch (RpcException e)
        {
            Check("Topology.Watch", e);
        }
        await cts.CancelAsync();
    }

    private async Task GarbageUnaryAsync()
    {
        var name = Pick(UnaryMethods).Split('/');
        var method = new Method<byte[], byte[]>(MethodType.Unary, name[0], name[1], Bytes, Bytes);
        await UnaryAsync($"{name[1]} (garbage)", () => _invoker.AsyncUnaryCall(method, null, new CallOptions(Headers(out _)), Garbage()).ResponseAsync, _ => { });
    }

    private byte[] Garbage() => _rng.Next(3) switch
    {
        0 => [0x0f, 0xff, 0xff, 0xff],
        1 => [.. Enumerable.Range(0, _rng.Next(1, 64)).Select(_ => (byte)_rng.Next(256))],
        _ => [0x0a, 0x80, 0x80, 0x80, 0x80, 0x10], // a length-delimited field longer than the message
    };

    private async Task TopologyAsync()
    {
        var headers = Headers(out _);
        switch (_rng.Next(3))
        {
            case 0:
                await UnaryAsync("ListDevices", () => _topology.ListDevicesAsync(new ListDevicesRequest(), headers).ResponseAsync, _ => { });
                break;
            case 1:
                await UnaryAsync("ListGroups", () => _topology.ListGroupsAsync(new ListGroupsRequest(), headers).ResponseAsync, _ => { });
                break;
            default:
                await UnaryAsync("GetGroup", () => _topology.GetGroupAsync(new GetGroupRequest { GroupId = GroupId() }, headers).ResponseAsync, _ => { });
                break;
        }
    }

    private async Task KernelAsync()
    {
        // Mostly as root (deep admin states), otherwise as whoever the headers say.
        var headers = _rng.Next(100) < 60 ? AdminHeaders(Root) : Headers(out _);
        switch (_rng.Next(8))
        {
            case 0:
                await UnaryAsync("BindDriver", () => _kernel.BindDriverAsync(new BindDriverRequest
                {
                    Address = Address(),
                    Driver = _rng.Next(100) switch
                    {
                        < 50 => "vfio-pci",
                        < 70 => "nvme",
                        < 80 => "pci-stub",
                        < 90 => "Bad Driver!",
                        _ => new string('x', _rng.Next(33, 50_000)),
                    },
                }, headers).ResponseAsync, _ => { });
                break;
            case 1:
                await UnaryAsync("UnbindDriver", () => _kernel.UnbindDriverAsync(new UnbindDriverRequest { Address = Address() }, headers).ResponseAsync, _ => { });
                break;
            case 2:
                await UnaryAsync("AddDevice", () => _kernel.AddDeviceAsync(new AddDeviceRequest
                {
                    Address = _rng.Next(2) == 0 ? $"0000:0{_rng.Next(8, 12):x}:00.{_rng.Next(0, 8)}" : Address(),
                    VendorId = _rng.Next(10) == 0 ? 0x1_0000u : 0x1234,
                    DeviceId = 0x11e8,
                    ClassCode = _rng.Next(10) == 0 ? 0x100_0000u : 0xff0000,
                    Model = Pick(["edu", "edu", "nvme", "bridge", "", "toaster"]),
                    Driver = Pick(["", "vfio-pci", "nvme"]),
                    Acs = _rng.Next(2) == 0,
                }, headers).ResponseAsync, _ => { });
                break;
            case 3:
                // Rare: removal takes devices away from everyone else for the rest of the run.
                if (_rng.Next(4) == 0)
                    await UnaryAsync("RemoveDevice", () => _kernel.RemoveDeviceAsync(new RemoveDeviceRequest { Address = Address() }, headers).ResponseAsync, _ => { });
                break;
            case 4:
                var victim = _sessions.Count > 0 && _rng.Next(4) != 0 ? Pick(_sessions) : null;
                var revoked = victim?.Id ?? Id([0, 1, 2]);
                await UnaryAsync("RevokeSession", () => _kernel.RevokeSessionAsync(new RevokeSessionRequest
                {
                    SessionId = revoked,
                    Reason = _rng.Next(10) == 0 ? new string('r', 300) : "fuzz",
                }, headers).ResponseAsync, _ =>
                {
                    foreach (var gone in _sessions.Where(s => s.Id == revoked).ToArray())
                    {
                        _sessions.Remove(gone);
                        _deadTokens.Add(gone.Token);
                    }
                });
                break;
            case 5:
                await UnaryAsync("GetStats", () => _kernel.GetStatsAsync(new GetStatsRequest(), headers).ResponseAsync, _ => { });
                break;
            default:
                await UnaryAsync("ListSessions", () => _kernel.ListSessionsAsync(new ListSessionsRequest(), headers).ResponseAsync, _ => { });
                break;
        }
    }

    private async Task MemoryAsync()
    {
        var headers = Headers(out _);
        switch (_rng.Next(4))
        {
            case 0:
                await UnaryAsync("Allocate", () => _memory.AllocateAsync(new AllocateRequest { Size = Size() }, headers).ResponseAsync, r => _vaddrs.Add(r.Vaddr));
                break;
            case 1:
                await UnaryAsync("Free", () => _memory.FreeAsync(new FreeRequest { Vaddr = Id(_vaddrs) }, headers).ResponseAsync, _ => { });
                break;
            case 2:
                await UnaryAsync("Read", () => _memory.ReadAsync(new ReadRequest
                {
                    Vaddr = Id(_vaddrs) + (ulong)_rng.Next(0, 100),
                    Size = _rng.Next(100) < 5 ? uint.MaxValue : (uint)_rng.Next(0, 9000),
                }, headers).ResponseAsync, _ => { });
                break;
            default:
                await UnaryAsync("Write", () => _memory.WriteAsync(new WriteRequest { Vaddr = Id(_vaddrs) + (ulong)_rng.Next(0, 100), Data = Data() }, headers).ResponseAsync, _ => { });
                break;
        }
    }

    private async Task VfioAsync()
    {
        var headers = Headers(out _);
        switch (_rng.Next(15))
        {
            case 0:
                await UnaryAsync("GetGroupStatus", () => _vfio.GetGroupStatusAsync(new GetGroupStatusRequest { GroupId = GroupId() }, headers).ResponseAsync, _ => { });
                break;
            case 1:
                await UnaryAsync("CreateContainer", () => _vfio.CreateContainerAsync(new CreateContainerRequest
                {
                    Type = _rng.Next(10) == 0 ? (ContainerType)7 : _rng.Next(2) == 0 ? ContainerType.Type1V2 : ContainerType.Iommufd,
                }, headers).ResponseAsync, r => _containers.Add(r.ContainerId));
                break;
            case 2:
                await UnaryAsync("DestroyContainer", () => _vfio.DestroyContainerAsync(new DestroyContainerRequest { ContainerId = Id(_containers) }, headers).ResponseAsync, _ => { });
                break;
            case 3:
            case 4:
                await UnaryAsync("SetContainer", () => _vfio.SetContainerAsync(new SetContainerRequest { GroupId = GroupId(), ContainerId = Id(_containers) }, headers).ResponseAsync, _ => { });
                break;
            case 5:
                await UnaryAsync("UnsetContainer", () => _vfio.UnsetContainerAsync(new UnsetContainerRequest { GroupId = GroupId() }, headers).ResponseAsync, _ => { });
                break;
            case 6:
                await UnaryAsync("BindDevice", () => _vfio.BindDeviceAsync(new BindDeviceRequest { Address = Address(), ContainerId = Id(_containers) }, headers).ResponseAsync, _ => { });
                break;
            case 7:
                await UnaryAsync("UnbindDevice", () => _vfio.UnbindDeviceAsync(new UnbindDeviceRequest { Address = Address() }, headers).ResponseAsync, _ => { });
                break;
            case 8:
                await UnaryAsync("GetIommuInfo", () => _vfio.GetIommuInfoAsync(new GetIommuInfoRequest { ContainerId = Id(_containers) }, headers).ResponseAsync, _ => { });
                break;
            case 9:
                var map = new MapDmaRequest
                {
                    ContainerId = Id(_containers),
                    Vaddr = _rng.Next(10) == 0 ? Id(_vaddrs) + 1 : Id(_vaddrs),
                    Size = Size(),
                    Read = _rng.Next(5) != 0,
                    Write = _rng.Next(5) != 0,
                };
                if (_rng.Next(4) != 0)
                    map.Iova = Iova();
                await UnaryAsync("MapDma", () => _vfio.MapDmaAsync(map, headers).ResponseAsync, r => _iovas.Add(r.Iova));
                break;
            case 10:
                await UnaryAsync("UnmapDma", () => _vfio.UnmapDmaAsync(new UnmapDmaRequest
                {
                    ContainerId = Id(_containers),
                    Iova = Iova(),
                    Size = Size(),
                    All = _rng.Next(8) == 0,
                }, headers).ResponseAsync, _ => { });
                break;
            case 11:
                await UnaryAsync("OpenDevice", () => _vfio.OpenDeviceAsync(new OpenDeviceRequest { Address = Address() }, headers).ResponseAsync, r => _handles.Add(r.Handle));
                break;
            case 12:
                if (_rng.Next(2) == 0)
                    await UnaryAsync("CloseDevice", () => _vfio.CloseDeviceAsync(new CloseDeviceRequest { Handle = Id(_handles) }, headers).ResponseAsync, _ => { });
                else
                    await UnaryAsync("ResetDevice", () => _vfio.ResetDeviceAsync(new ResetDeviceRequest { Handle = Id(_handles) }, headers).ResponseAsync, _ => { });
                break;
            case 13:
                await UnaryAsync("RegionRead", () => _vfio.RegionReadAsync(new RegionReadRequest
                {
                    Handle = Id(_handles),
                    Index = (uint)_rng.Next(0, 9),
                    Offset = _rng.Next(4) == 0 ? ulong.MaxValue : (ulong)_rng.Next(0, 300),
                    Size = (uint)Pick([1, 2, 4, 8, 3, 0, 256, 100_000]),
                }, headers).ResponseAsync, _ => { });
                break;
            default:
                // Bus Master on, mostly: writes to config offset 4 open the DMA paths.
                var config = _rng.Next(3) != 0;
                await UnaryAsync("RegionWrite", () => _vfio.RegionWriteAsync(new RegionWriteRequest
                {
                    Handle = Id(_handles),
                    Index = config ? 7u : (uint)_rng.Next(0, 9),
                    Offset = config ? 4 : (ulong)_rng.Next(0, 0x100),
                    Data = config ? ByteString.CopyFrom(6, 0) : Data(16),
                }, headers).ResponseAsync, _ => { });
                break;
        }
    }

    private async Task DmaStreamAsync()
    {
        Calls++;
        using var cts = new CancellationTokenSource();
        var requests = _rng.Next(1, 24);
        var cancelAt = _rng.Next(6) == 0 ? _rng.Next(0, requests) : -1;
        using var call = new Dma.DmaClient(CancellingInvoker()).Stream(Headers(out _), cancellationToken: cts.Token);
        try
        {
            for (var i = 0; i < requests; i++)
            {
                if (i == cancelAt)
                {
                    await cts.CancelAsync();
                    break;
                }
                var request = i == 0 && _rng.Next(10) != 0
                    ? new DmaRequest { Tag = 0, Open = new DmaOpen { Handle = Id(_handles) } }
                    : DmaOp((ulong)i);
                if (!await TryWriteAsync(call.RequestStream, request))
                    break;
                StreamMessages++;
            }
            if (!cts.IsCancellationRequested)
                await TryCompleteAsync(call.RequestStream);
            while (await call.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(CallTimeout))
            {
                if (call.ResponseStream.Current.Completion is { Ok: false, Error: { } error } && error.Reason.Length == 0)
                    throw new Xunit.Sdk.XunitException($"seed {Seed}: a DMA completion failed without an errno: {error}");
            }
            Record(null);
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.Cancelled && cts.IsCancellationRequested)
        {
            Record(null);
        }
        catch (RpcException e)
        {
            Check("Dma.Stream", e);
        }
        await WaitStreamsClosedAsync();
    }

    /// <summary>
    /// Writes one request; false when the broker has already ended the call (it refused the stream,
    /// or failed it), whose status the caller then reads from the response stream.
    /// </summary>
    private static async Task<bool> TryWriteAsync<T>(IClientStreamWriter<T> stream, T message)
    {
        try
        {
            await stream.WriteAsync(message).WaitAsync(CallTimeout);
            return true;
        }
        catch (Exception e) when (e is RpcException or InvalidOperationException)
        {
            return false;
        }
    }

    private static async Task TryCompleteAsync<T>(IClientStreamWriter<T> stream)
    {
        try
        {
            await stream.CompleteAsync().WaitAsync(CallTimeout);
        }
        catch (Exception e) when (e is RpcException or InvalidOperationException)
        {
            // Ended by the broker already; the response stream says how.
        }
    }

    private DmaRequest DmaOp(ulong tag)
    {
        var request = new DmaRequest { Tag = tag };
        switch (_rng.Next(9))
        {
            case 0:
                request.Write = new DmaWrite { Iova = Iova(), Data = Data(5000) };
                break;
            case 1:
                request.Read = new DmaRead { Iova = Iova(), Length = _rng.Next(20) == 0 ? uint.MaxValue : (uint)_rng.Next(0, 9000) };
                break;
            case 2:
                request.Copy = new DmaCopy { SrcIova = Iova(), DstIova = Iova(), Length = (uint)_rng.Next(0, 9000) };
                break;
            case 3:
                request.MmioWrite = new MmioWrite
                {
                    Index = (uint)_rng.Next(0, 9),
                    Offset = (ulong)Pick([0x04, 0x08, 0x20, 0x60, 0x64, 0x80, 0x88, 0x90, 0x98, 0x40000, 0x100000, _rng.Next()]),
                    Width = (uint)Pick([4, 8, 1, 2, 3, 0, 1000]),
                    Value = (ulong)_rng.NextInt64(),
                };
                break;
            case 4:
                request.MmioRead = new MmioRead { Index = (uint)_rng.Next(0, 9), Offset = (ulong)_rng.Next(0, 0x100), Width = (uint)Pick([4, 8, 3]) };
                break;
            case 5:
                var batch = new DmaBatch();
                for (var i = 0; i < _rng.Next(0, 8); i++)
                    batch.Requests.Add(DmaOp(tag));
                request.Batch = batch;
                break;
            case 6:
                request.Open = new DmaOpen { Handle = Id(_handles) };
                break;
            case 7:
                // Nested deeper than the parser allows: the whole stream fails EINVAL.
                var deep = new DmaRequest { Tag = tag, Read = new DmaRead { Length = 1 } };
                for (var i = 0; i < (_rng.Next(4) == 0 ? 120 : 3); i++)
                    deep = new DmaRequest { Tag = tag, Batch = new DmaBatch { Requests = { deep } } };
                return deep;
            default:
                // No operation at all.
                break;
        }
        return request;
    }

    // ---- checks ----

    private async Task UnaryAsync<T>(string name, Func<Task<T>> call, Action<T> onSuccess)
    {
        Calls++;
        if (Calls % 1000 == 0)
            Reconnect();
        var before = State();
        var started = System.Diagnostics.Stopwatch.GetTimestamp();
        try
        {
            var response = await call().WaitAsync(CallTimeout);
            onSuccess(response);
            Record(null);
        }
        catch (RpcException e)
        {
            Check(name, e);
            var after = State();
            if (!before.Same(after))
                throw new Xunit.Sdk.XunitException($"seed {Seed}, call {Calls}: rejected {name} ({e.Status}) changed the state:\n before {before}\n after  {after}");
        }
        finally
        {
            var took = System.Diagnostics.Stopwatch.GetElapsedTime(started);
            if (took > _slowestCall.Took)
                _slowestCall = (name, took);
        }
    }

    /// <summary>
    /// What a rejected call must leave as it was: the journal's revision and every live count but
    /// two that no unary call touches and that the fuzzer's own cancelled streams move in the
    /// background (a cancelled Watch or Dma.Stream ends on the broker after it ends on the client):
    /// watchers and DMA streams.
    /// </summary>
    private FuzzState State()
    {
        var snapshot = _broker.Broker.Journal.Current;
        return new FuzzState([.. snapshot.Groups.Values], [.. snapshot.Devices.Values], _broker.Broker.GetStats() with { Watchers = 0, DmaStreams = 0 });
    }

    /// <summary>
    /// Every group and device view (a view is replaced whenever its group or device changes, so
    /// equal views mean unchanged ones; the revision alone would also count a session_ended of an
    /// earlier teardown), and the live counts.
    /// </summary>
    private sealed record FuzzState(GroupInfo[] Groups, DeviceInfo[] Devices, Core.BrokerStats Stats)
    {
        public bool Same(FuzzState other) => Groups.SequenceEqual(other.Groups) && Devices.SequenceEqual(other.Devices) && Stats == other.Stats;

        public override string ToString() => $"{Groups.Length} groups ({string.Join(", ", Groups.Where(g => g.OwnerKind != Core.Topology.OwnerKind.None).Select(g => $"{g.Id}:{g.OwnerKind}x{g.OwnerCount}/s{g.OwnerSession}/g{g.Generation}/{g.Domain}"))}), {Stats}";
    }

    private void Check(string name, RpcException e)
    {
        if (e.StatusCode is StatusCode.Internal or StatusCode.Unknown)
            throw new Xunit.Sdk.XunitException($"seed {Seed}, call {Calls}: {name} ended {e.StatusCode}: {e.Status.Detail}");
        var info = e.GetRpcStatus()?.GetDetail<ErrorInfo>();
        if (info is null || info.Domain != WireConstants.ErrorDomain || info.Reason.Length == 0)
            throw new Xunit.Sdk.XunitException($"seed {Seed}, call {Calls}: {name} failed {e.StatusCode} without ErrorInfo: {e.Status.Detail}");
        if (e.Status.Detail.Length > 2000)
            throw new Xunit.Sdk.XunitException($"seed {Seed}, call {Calls}: {name}'s error message is {e.Status.Detail.Length} characters");
        Record($"{e.StatusCode}/{info.Reason}");
    }

    /// <summary>Counts an outcome: OK, or the status and errno.</summary>
    private void Record(string? error)
    {
        var key = error ?? "OK";
        _outcomes[key] = _outcomes.GetValueOrDefault(key) + 1;
    }

    /// <summary>SPEC §10: 1 (never kernel and user at once, never two user owners), 2 (no DMA-API driver in a user-owned group), 6 (no negative counts).</summary>
    private void CheckInvariants()
    {
        var snapshot = _broker.Broker.Journal.Current;
        foreach (var group in snapshot.Groups.Values)
        {
            var where = $"seed {Seed}, call {Calls}: group {group.Id}";
            Assert.True(group.OwnerCount >= 0, $"{where}: owner count {group.OwnerCount}");
            Assert.True(group.OwnerKind != Core.Topology.OwnerKind.User || (group.OwnerSession != 0 && group.OwnerCount > 0), $"{where}: user-owned without a session");
            Assert.True(group.OwnerKind == Core.Topology.OwnerKind.User || group.OwnerSession == 0, $"{where}: {group.OwnerKind} with owner session {group.OwnerSession}");
            if (group.OwnerKind != Core.Topology.OwnerKind.User)
                continue;
            foreach (var address in group.Devices)
            {
                var device = snapshot.Devices[address];
                Assert.True(device.Driver is null || device.DriverManagedDma, $"{where}: user-owned, but {address} has DMA-API driver {device.Driver}");
            }
        }
        var stats = _broker.Broker.GetStats();
        Assert.True(stats.Sessions >= 0 && stats.Containers >= 0 && stats.OpenDevices >= 0 && stats.DmaStreams >= 0 && stats.Mappings >= 0,
            $"seed {Seed}: a negative count: {stats}");
    }

    /// <summary>
    /// Waits until sessions that end in the background (a Session.Open the client cancelled) are
    /// gone: each teardown ends with a session_ended in the journal, so every wait is for an event.
    /// </summary>
    private async Task WaitQuietAsync()
    {
        while (_broker.Broker.Sessions.Live.Count != _sessions.Count)
        {
            if (!await _journal.MoveNextAsync().AsTask().WaitAsync(CallTimeout))
                throw new Xunit.Sdk.XunitException($"seed {Seed}: the journal ended");
        }
    }

    /// <summary>Waits until no DMA stream is open: a cancelled stream's server side ends after the client's.</summary>
    private Task WaitStreamsClosedAsync() =>
        Task.WhenAll(_broker.Broker.Sessions.Live.Select(s => s.WhenStreamsClosed())).WaitAsync(CallTimeout);

    public ValueTask DisposeAsync()
    {
        // Ends the journal enumerator too (it may have a read pending after a failed wait).
        _cancellingChannel?.Dispose();
        _channel.Dispose();
        _journalWatcher.Dispose();
        return ValueTask.CompletedTask;
    }
}
