using System.Net.Sockets;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Grpc.Core;
using Grpc.Net.Client;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Options;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Server.Tests;

/// <summary>
/// Sessions by the thousand (issue 11): held over several TTLs while they ping, spread over more
/// streams than one connection carries, and a dead connection's release published while the others
/// keep the broker busy. Everything runs on a fake clock that moves only when a test says so, so
/// no lease can end by accident and every expiry is the test's doing. How much memory a session
/// takes and how fast a release comes are the benchmark's to show (sessions, sigkill).
/// </summary>
[Collection(RunsAlone.Name)]
public sealed class ManySessionsTests
{
    private const uint EduGroup = 16;
    private static readonly TimeSpan Ttl = TimeSpan.FromSeconds(3);

    [Fact]
    public async Task ManySessions_MoreThanOneConnectionCarries_NoneLostOverFourTtlsWhilePinging()
    {
        // Two clients, each with more sessions than one connection may carry
        // (--max-streams-per-connection): each client opens further connections for the rest.
        const int Clients = 2;
        const int StreamsPerConnection = 300;
        const int PerClient = (2 * StreamsPerConnection) + 150;
        var time = new FakeTimeProvider();
        await using var broker = await TestBroker.StartAsync(time, "--lease-ttl-ms", ((int)Ttl.TotalMilliseconds).ToString(System.Globalization.CultureInfo.InvariantCulture),
            "--max-streams-per-connection", StreamsPerConnection.ToString(System.Globalization.CultureInfo.InvariantCulture));
        Assert.Equal(StreamsPerConnection, broker.Services.GetRequiredService<IOptions<KestrelServerOptions>>().Value.Limits.Http2.MaxStreamsPerConnection);
        var clients = Enumerable.Range(0, Clients).Select(_ => BrokerClient.Connect(broker.Address)).ToArray();
        var calls = new AsyncDuplexStreamingCall<SessionRequest, SessionEvent>[Clients * PerClient];
        var renewals = new Renewals(broker.Broker.Sessions);
        try
        {
            await Parallel.ForEachAsync(Enumerable.Range(0, calls.Length), new ParallelOptions { MaxDegreeOfParallelism = 32 }, async (i, cancel) =>
            {
                var call = calls[i] = clients[i % Clients].Raw.Session.Open(cancellationToken: cancel);
                Assert.True(await call.ResponseStream.MoveNext(cancel));
                Assert.NotNull(call.ResponseStream.Current.Opened);
            }).WaitAsync(TestBroker.Timeout * 6);
            Assert.Equal(calls.Length, broker.Broker.Sessions.Counts.Live);

            // Four rounds: every session pings, the broker reads every ping, the clock moves on by
            // a millisecond less than the TTL. That is four TTLs in all, and not one lease runs out.
            for (var round = 0; round < 4; round++)
            {
                var read = renewals.Expect(calls.Length);
                await Parallel.ForEachAsync(calls, new ParallelOptions { MaxDegreeOfParallelism = 32 }, async (call, cancel) =>
                    await call.RequestStream.WriteAsync(new SessionRequest { Ping = new Ping() }, cancel));
                await read.WaitAsync(TestBroker.Timeout * 3);
                time.Advance(Ttl - TimeSpan.FromMilliseconds(1));
                var counts = broker.Broker.Sessions.Counts;
                Assert.Equal((calls.Length, 0L), (counts.Live, counts.Closed));
            }

            // The leases are real: once the pings stop, one more millisecond ends every session.
            time.Advance(TimeSpan.FromMilliseconds(1));
            await Parallel.ForEachAsync(calls, new ParallelOptions { MaxDegreeOfParallelism = 32 }, async (call, cancel) =>
            {
                Assert.True(await call.ResponseStream.MoveNext(cancel));
                Assert.Equal("lease expired", call.ResponseStream.Current.Revoked?.Reason);
            }).WaitAsync(TestBroker.Timeout * 6);
        }
        finally
        {
            foreach (var call in calls)
                call?.Dispose();
            foreach (var client in clients)
                client.Dispose();
        }
    }

    [Fact]
    public async Task ConnectionLost_WhileHundredsOfSessionsPingFlatOut_ReleasePublishedAndNoOtherSessionEnds()
    {
        const int Busy = 400;
        // A clock that never moves: no lease can end, so only the dead connection can release the group.
        await using var broker = await TestBroker.StartAsync(new FakeTimeProvider(), "--lease-ttl-ms", "3000");
        await using var watcher = new Watcher(broker.Client);
        await watcher.NextAsync();
        using var busyClient = BrokerClient.Connect(broker.Address);
        var busy = new AsyncDuplexStreamingCall<SessionRequest, SessionEvent>[Busy];
        using var stop = new CancellationTokenSource();
        var renewals = new Renewals(broker.Broker.Sessions);
        var pingers = new List<Task>();
        try
        {
            for (var i = 0; i < Busy; i++)
            {
                busy[i] = busyClient.Raw.Session.Open();
                Assert.True(await busy[i].ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));
            }

            // The holder's session runs over a connection of its own, whose socket the test holds.
            Socket? socket = null;
            using var handler = new SocketsHttpHandler
            {
                ConnectCallback = async (context, cancel) =>
                {
                    socket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
                    await socket.ConnectAsync(context.DnsEndPoint, cancel);
                    return new NetworkStream(socket, ownsSocket: true);
                },
            };
            using var channel = GrpcChannel.ForAddress(broker.Address, new GrpcChannelOptions { HttpHandler = handler });
            using var holder = new Session.SessionClient(channel).Open();
            Assert.True(await holder.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));
            var opened = holder.ResponseStream.Current.Opened;
            var vfio = broker.VfioWithToken(opened.Token);
            var container = (await vfio.CreateContainerAsync(new CreateContainerRequest { Type = ContainerType.Type1V2 })).ContainerId;
            await vfio.SetContainerAsync(new SetContainerRequest { GroupId = EduGroup, ContainerId = container });
            await watcher.WaitForGroupAsync(g => g.Id == EduGroup && g.OwnerKind == OwnerKind.User);

            // Every busy session pings as fast as it can, from now until the test ends; the broker
            // has read at least one ping of each before the connection dies.
            var pinging = renewals.Expect(Busy);
            foreach (var call in busy)
                pingers.Add(PingFlatOutAsync(call, stop.Token));
            await pinging.WaitAsync(TestBroker.Timeout * 3);

            // The connection dies as a killed process's does: the socket closes under the client.
            socket!.LingerState = new LingerOption(true, 0);
            socket.Close();

            var released = await watcher.WaitForGroupAsync(g => g.Id == EduGroup);
            Assert.Equal((OwnerKind.None, 0ul), (released.OwnerKind, released.OwnerSession));
            string reason;
            while (true)
            {
                if ((await watcher.NextAsync()).SessionEnded is { } e && e.SessionId == opened.SessionId)
                {
                    reason = e.Reason;
                    break;
                }
            }
            Assert.Equal("connection lost", reason);
            // Published while the others were still pinging flat out, and none of them ended.
            Assert.All(pingers, p => Assert.False(p.IsCompleted, $"a busy session's pings stopped: {p.Exception?.GetBaseException().Message}"));
            var counts = broker.Broker.Sessions.Counts;
            Assert.Equal((Busy, 1L), (counts.Live, counts.Closed));
        }
        finally
        {
            await stop.CancelAsync();
            await Task.WhenAll(pingers);
            foreach (var call in busy)
                call?.Dispose();
        }
    }

    private static async Task PingFlatOutAsync(AsyncDuplexStreamingCall<SessionRequest, SessionEvent> call, CancellationToken stop)
    {
        try
        {
            while (!stop.IsCancellationRequested)
                await call.RequestStream.WriteAsync(new SessionRequest { Ping = new Ping() }, stop);
        }
        catch (Exception e) when (e is OperationCanceledException or RpcException { StatusCode: StatusCode.Cancelled } && stop.IsCancellationRequested)
        {
            // The test is over.
        }
    }

    /// <summary>Counts the broker's lease renewals (its <c>Renewed</c> hook) toward a number the test expects.</summary>
    private sealed class Renewals
    {
        private readonly HashSet<ulong> _seen = [];
        private TaskCompletionSource? _done;
        private int _expected;

        public Renewals(Core.Sessions.SessionRegistry sessions) => sessions.Renewed = Renew;

        /// <summary>Completes once <paramref name="sessions"/> distinct sessions have renewed their leases from now on.</summary>
        public Task Expect(int sessions)
        {
            lock (_seen)
            {
                _seen.Clear();
                _expected = sessions;
                _done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                return _done.Task;
            }
        }

        private void Renew(Core.Sessions.Session session)
        {
            lock (_seen)
            {
                if (_seen.Add(session.Id) && _seen.Count == _expected)
                    _done?.TrySetResult();
            }
        }
    }
}
