using DmaBroker.Client;
using DmaBroker.Core.Topology;
using DmaBroker.Protocol.V1;
using DmaBroker.Server.Hosting;
using DmaBroker.Server.Services;
using Grpc.Core;
using Grpc.Net.Client;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Server.Tests;

/// <summary>
/// Stopping the broker ends every session, each told <c>revoked</c>, before the server stops taking
/// calls. Bounded in time, so it runs alone (see <see cref="RunsAlone"/>).
/// </summary>
[Collection(RunsAlone.Name)]
public sealed class ShutdownTests
{
    [Fact]
    public async Task Stop_OpenSessions_EachToldRevokedBeforeTheServerStops()
    {
        // A lease longer than the test: only the broker's stop ends these silent streams.
        var broker = await TestBroker.StartAsync(null, "--lease-ttl-ms", "3600000");
        using var channel = GrpcChannel.ForAddress(broker.Address);
        var sessions = new Session.SessionClient(channel);
        using var first = sessions.Open();
        using var second = sessions.Open();
        AsyncDuplexStreamingCall<SessionRequest, SessionEvent>[] calls = [first, second];
        foreach (var call in calls)
            Assert.NotNull((await ThinServiceTests.NextEventAsync(call)).Opened);
        var told = calls.Select(async call => (await ThinServiceTests.NextEventAsync(call)).Revoked?.Reason ?? "no revoked").ToArray();

        var stopped = broker.DisposeAsync().AsTask();

        Assert.All(await Task.WhenAll(told).WaitAsync(TestBroker.Timeout), reason => Assert.Equal("broker shutting down", reason));
        await stopped.WaitAsync(TestBroker.Timeout);
        Assert.Empty(broker.Broker.Sessions.Live);
    }

    [Fact]
    public async Task Stop_CallsOutlastTheShutdownGrace_CutShortSoTheStopEndsWithoutTheHostTimeout()
    {
        // The silent client's call waits its own grace (2 s) for the client to close its side,
        // longer than this broker's stop waits: as when a loaded machine slows the calls past the
        // stop's grace. A call that completed after the server had stopped would hold the stop
        // until the host's shutdown timeout (30 s); cut short, it ends before the server stops.
        var broker = await TestBroker.StartAsync(null, "--lease-ttl-ms", "3600000", "--DmaBroker:ShutdownGrace=00:00:00.100");
        using var channel = GrpcChannel.ForAddress(broker.Address);
        using var call = new Session.SessionClient(channel).Open();
        Assert.NotNull((await ThinServiceTests.NextEventAsync(call)).Opened);

        await broker.DisposeAsync().AsTask().WaitAsync(TestBroker.Timeout);

        Assert.Empty(broker.Broker.Sessions.Live);
    }

    [Fact]
    public async Task Stop_LibrarySessions_CloseTheirSideOnRevokedSoTheStopNeedsNoGrace()
    {
        // On a clock that never moves, the broker's grace for a client that keeps its side of the
        // stream open never ends: the stop completes only because the library closes it.
        var broker = await TestBroker.StartAsync(new FakeTimeProvider());
        using var client = BrokerClient.Connect(broker.Address);
        await using var first = await client.OpenSessionAsync("first");
        await using var second = await client.OpenSessionAsync("second");

        await broker.DisposeAsync().AsTask().WaitAsync(TestBroker.Timeout);

        Assert.Equal("broker shutting down", await first.Ended.WaitAsync(TestBroker.Timeout));
        Assert.Equal("broker shutting down", await second.Ended.WaitAsync(TestBroker.Timeout));
    }
}

/// <summary>
/// The services only map: what the core refuses reaches the wire as a clean errno (never INTERNAL,
/// never an allocation of what a request asks for), and stopping the broker still ends every
/// session, each told <c>revoked</c>, before the server stops taking calls.
/// </summary>
public sealed class ThinServiceTests
{
    [Fact]
    public async Task MemoryRead_SizeBeyondOneTransfer_FailsEinvalWithoutAllocating()
    {
        await using var broker = await TestBroker.StartAsync(new FakeTimeProvider());
        using var call = new Session.SessionClient(broker.Client.Raw.Channel).Open();
        var token = (await NextEventAsync(call)).Opened.Token;
        var memory = new Memory.MemoryClient(broker.Client.Raw.Channel);
        var headers = new Metadata { { SessionAuthentication.TokenHeader, token } };
        var vaddr = (await memory.AllocateAsync(new AllocateRequest { Size = 4096 }, headers)).Vaddr;

        var e = await Assert.ThrowsAsync<RpcException>(() => memory.ReadAsync(new ReadRequest { Vaddr = vaddr, Size = uint.MaxValue }, headers).ResponseAsync);

        Assert.Equal((StatusCode.InvalidArgument, "EINVAL"), (e.StatusCode, Reason(e)));
    }

    [Theory]
    [InlineData(0u, 0u)]
    [InlineData(0u, 3u)]
    [InlineData(0u, 1000u)]
    [InlineData(0u, uint.MaxValue)]
    [InlineData(7u, 0u)]
    [InlineData(7u, 0x8000_0002u)]
    public async Task DmaRegisterAccess_WidthNotOneTwoFourOrEight_CompletesEinval(uint index, uint width)
    {
        await using var core = new Core.Broker(TopologyDocument.Default());
        var session = core.Sessions.Open();
        var edu = Core.PciAddress.Parse("0000:0b:00.0");
        core.Vfio.BindDevice(session, edu, core.Vfio.CreateContainer(session, Core.Vfio.ContainerType.Iommufd).Id);
        var handle = core.Vfio.OpenDevice(session, edu);

        var read = DmaService.Execute(handle, new DmaRequest { Tag = 1, MmioRead = new MmioRead { Index = index, Width = width } });
        var write = DmaService.Execute(handle, new DmaRequest { Tag = 2, MmioWrite = new MmioWrite { Index = index, Width = width, Value = 1 } });

        Assert.Equal(("EINVAL", "EINVAL"), (read.Response.Completion.Error?.Reason, write.Response.Completion.Error?.Reason));
    }

    internal static async Task<SessionEvent> NextEventAsync(AsyncDuplexStreamingCall<SessionRequest, SessionEvent> call)
    {
        Assert.True(await call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout), "the session stream ended");
        return call.ResponseStream.Current;
    }

    private static string Reason(RpcException e) =>
        e.GetRpcStatus()?.Details.Select(d => d.TryUnpack<Google.Rpc.ErrorInfo>(out var info) ? info.Reason : null).FirstOrDefault(r => r is not null) ?? "";
}
