using System.Net;
using System.Net.Sockets;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Grpc.Core;

namespace DmaBroker.Server.Tests;

/// <summary>The .NET client library against a real server: typed handles, the DMA channel, broker loss.</summary>
public sealed class ClientLibraryTests
{
    private const ulong Iova = 0x20_0000;

    private static async Task<(BrokerSession Session, Container Container, DmaBuffer Buffer, VfioDevice Device)> ClaimAsync(TestBroker broker, string address = "0000:0b:00.0", uint group = 17)
    {
        var session = await broker.Client.OpenSessionAsync("lib");
        var container = await session.NewContainerAsync(ContainerType.Type1V2);
        await container.SetGroupAsync(group);
        var buffer = await session.AllocateAsync(0x10000);
        await container.MapAsync(buffer, Iova);
        var device = await session.OpenDeviceAsync(address);
        await device.EnableBusMasterAsync();
        return (session, container, buffer, device);
    }

    [Fact]
    public async Task DmaChannel_ManySmallPipelinedOps_AllCompleteInOrderAndLand()
    {
        await using var broker = await TestBroker.StartAsync();
        var (session, _, buffer, device) = await ClaimAsync(broker);
        await using var _ = session;
        await using var dma = await device.OpenDmaChannelAsync(new DmaChannelOptions { MaxInFlight = 64, MaxBatch = 16 });

        var writes = Enumerable.Range(0, 1000).Select(i => dma.WriteAsync(Iova + (ulong)(i % 1024) * 64, BitConverter.GetBytes((long)i))).ToArray();
        var results = await Task.WhenAll(writes).WaitAsync(TestBroker.Timeout);

        Assert.All(results, r => Assert.True(r.Ok));
        Assert.Equal(results.Select(r => r.Tag).Order(), results.Select(r => r.Tag));
        var memory = await buffer.ReadAsync(999 * 64, 8);
        Assert.Equal(999L, BitConverter.ToInt64(memory));
    }

    /// <summary>
    /// DmaStreamsOwnConnection: the DMA stream goes over a second connection, authenticated as the
    /// session as its calls are; UnmapDma on the first still orders against it (SPEC §4).
    /// </summary>
    [Fact]
    public async Task DmaStreamsOwnConnection_StreamAuthenticatedAsTheSession_UnmapStillFencesIt()
    {
        await using var broker = await TestBroker.StartAsync();
        using var client = BrokerClient.Connect(broker.Address, new BrokerClientOptions { DmaStreamsOwnConnection = true });
        await using var session = await client.OpenSessionAsync("own-connection");
        var container = await session.NewContainerAsync(ContainerType.Type1V2);
        await container.SetGroupAsync(17);
        var buffer = await session.AllocateAsync(0x10000);
        var mapping = await container.MapAsync(buffer, Iova);
        var device = await session.OpenDeviceAsync("0000:0b:00.0");
        await device.EnableBusMasterAsync();
        await using var dma = await device.OpenDmaChannelAsync();

        (await dma.WriteAsync(Iova + 64, BitConverter.GetBytes(0x1122334455667788L)).WaitAsync(TestBroker.Timeout)).EnsureOk();
        Assert.Equal(0x1122334455667788L, BitConverter.ToInt64(await buffer.ReadAsync(64, 8)));
        Assert.Equal(1u, (await broker.Client.Admin.GetStatsAsync()).DmaStreams);

        await mapping.UnmapAsync();
        var late = await dma.WriteAsync(Iova + 64, BitConverter.GetBytes(-1L)).WaitAsync(TestBroker.Timeout);
        Assert.Equal((false, FaultReason.Unmapped, Iova), (late.Ok, late.Fault?.Reason, late.Fault?.Iova));
        Assert.Equal(0x1122334455667788L, BitConverter.ToInt64(await buffer.ReadAsync(64, 8)));
    }

    [Fact]
    public async Task DmaChannel_ConcurrentCallersMixingFaultsAndErrors_EachGetsItsOwnResult()
    {
        await using var broker = await TestBroker.StartAsync();
        var (session, _, _, device) = await ClaimAsync(broker);
        await using var _ = session;
        await using var dma = await device.OpenDmaChannelAsync(new DmaChannelOptions { MaxInFlight = 64, MaxBatch = 16 });

        // Eight callers at once, each in its own 8 KiB of the buffer; a call's tasks complete in call
        // order, so each caller's read sees its own write, whatever batches the calls were split into.
        var callers = Enumerable.Range(0, 8).Select(caller => Task.Run(async () =>
        {
            var calls = new List<(Task<DmaResult> Write, Task<DmaResult> Read, Task<DmaResult> Fault, Task<DmaResult> Invalid, long Value)>();
            for (var i = 0; i < 100; i++)
            {
                var iova = Iova + (ulong)(caller * 0x2000 + i % 128 * 64);
                var value = caller * 1000L + i;
                calls.Add((dma.WriteAsync(iova, BitConverter.GetBytes(value)), dma.ReadAsync(iova, 8),
                    dma.ReadAsync(0x7000_0000 + (ulong)caller * 0x1000, 16), dma.MmioReadAsync(0, 0, width: 3), value));
            }
            foreach (var (write, read, fault, invalid, value) in calls)
            {
                Assert.True((await write).Ok);
                Assert.Equal(value, BitConverter.ToInt64((await read).EnsureOk().Data.Span));
                var faulted = (await fault).Fault;
                Assert.NotNull(faulted);
                Assert.Equal((0x7000_0000 + (ulong)caller * 0x1000, FaultReason.Unmapped), (faulted.Iova, faulted.Reason));
                var rejected = await invalid;
                Assert.Equal(Errno.EINVAL, Assert.Throws<DmaRequestException>(() => rejected.EnsureOk()).Errno);
            }
        })).ToArray();

        await Task.WhenAll(callers).WaitAsync(TestBroker.Timeout);
    }

    [Fact]
    public async Task DmaChannel_Fault_ResultCarriesFaultAndEnsureOkThrowsTyped()
    {
        await using var broker = await TestBroker.StartAsync();
        var (session, container, _, device) = await ClaimAsync(broker);
        await using var _ = session;
        await using var dma = await device.OpenDmaChannelAsync();
        var result = await dma.ReadAsync(0x7000_0000, 16);

        Assert.False(result.Ok);
        var e = Assert.Throws<DmaFaultException>(() => result.EnsureOk());
        Assert.Equal((0x7000_0000ul, FaultReason.Unmapped), (e.Fault.Iova, e.Fault.Reason));
        var info = await container.GetInfoAsync();
        Assert.Equal(65534u, info.DmaAvail);
        var fault = await session.Events.ReadAsync().AsTask().WaitAsync(TestBroker.Timeout);
        Assert.Equal(0x7000_0000ul, fault.Fault.Iova);
    }

    [Fact]
    public async Task Errors_AreTypedWithErrno()
    {
        await using var broker = await TestBroker.StartAsync();
        var (session, container, buffer, _) = await ClaimAsync(broker);
        await using var _ = session;
        var busy = await Assert.ThrowsAsync<BrokerException>(() => buffer.FreeAsync());
        Assert.Equal(Errno.EBUSY, busy.Errno);
        var exists = await Assert.ThrowsAsync<BrokerException>(() => container.MapAsync(buffer, Iova));
        Assert.Equal(Errno.EEXIST, exists.Errno);
        Assert.Equal(0x10000ul, await container.UnmapAllAsync());
        await buffer.FreeAsync();
    }

    [Fact]
    public async Task Admin_RejectedByBroker_BrokerExceptionWithErrnoAndStatus()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var session = await broker.Client.OpenSessionAsync("owner");
        await session.SetContainerAsync(13, await session.CreateContainerAsync(ContainerType.Type1V2));

        // A DMA-API driver into the user-owned switch group.
        var e = await Assert.ThrowsAsync<BrokerException>(() => broker.Client.Admin.BindDriverAsync("0000:07:00.0", "nvme"));

        Assert.Equal((Errno.EBUSY, "EBUSY", StatusCode.FailedPrecondition), (e.Errno, e.Reason, e.StatusCode));
    }

    [Fact]
    public async Task RevokedSession_NextCall_BrokerAuthenticationException()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var session = await broker.Client.OpenSessionAsync("victim");
        await broker.Client.Admin.RevokeSessionAsync(session.Id);

        var e = await Assert.ThrowsAsync<BrokerAuthenticationException>(() => session.CreateContainerAsync(ContainerType.Type1V2));

        Assert.Equal((Errno.EACCES, StatusCode.Unauthenticated), (e.Errno, e.StatusCode));
    }

    [Fact]
    public async Task RawCall_UnknownToken_FromGivesBrokerAuthenticationException()
    {
        await using var broker = await TestBroker.StartAsync();
        var request = new CreateContainerRequest { Type = ContainerType.Type1V2 };

        var rpc = await Assert.ThrowsAsync<RpcException>(() => broker.VfioWithToken("not-a-token").CreateContainerAsync(request).ResponseAsync);

        var e = Assert.IsType<BrokerAuthenticationException>(BrokerException.From(rpc));
        Assert.Equal((Errno.EACCES, "EACCES"), (e.Errno, e.Reason));
    }

    [Fact]
    public async Task Connect_NothingListening_BrokerUnavailableException()
    {
        int port;
        using (var listener = new TcpListener(IPAddress.Loopback, 0))
        {
            listener.Start();
            port = ((IPEndPoint)listener.LocalEndpoint).Port;
        }
        using var client = BrokerClient.Connect($"http://127.0.0.1:{port}");

        var e = await Assert.ThrowsAsync<BrokerUnavailableException>(() => client.ListDevicesAsync().WaitAsync(TestBroker.Timeout));

        Assert.Equal((StatusCode.Unavailable, Errno.Unknown, "Unavailable"), (e.StatusCode, e.Errno, e.Reason));
    }

    [Fact]
    public async Task Connect_HostPortWithoutScheme_IsCleartextHttp()
    {
        await using var broker = await TestBroker.StartAsync();
        var hostPort = new Uri(broker.Address).Authority;
        Assert.DoesNotContain("://", hostPort, StringComparison.Ordinal);
        using var client = BrokerClient.Connect(hostPort);

        var devices = await client.ListDevicesAsync().WaitAsync(TestBroker.Timeout);

        Assert.Equal(23, devices.Devices.Count);
    }

    [Theory]
    [InlineData("ftp://127.0.0.1:50051")]
    [InlineData("unix:relative.sock")]
    [InlineData("http://")]
    public void Connect_NotABrokerAddress_ArgumentException(string address) =>
        Assert.Throws<ArgumentException>(() => BrokerClient.Connect(address));

    [Fact]
    public async Task Connect_HttpsToACleartextListener_BrokerUnavailableException()
    {
        await using var broker = await TestBroker.StartAsync();
        using var client = BrokerClient.Connect("https://" + new Uri(broker.Address).Authority);

        // The TLS handshake fails below gRPC (which calls that INTERNAL): no broker was reached.
        var e = await Assert.ThrowsAsync<BrokerUnavailableException>(() => client.ListDevicesAsync().WaitAsync(TestBroker.Timeout));

        Assert.Equal((StatusCode.Internal, Errno.Unknown), (e.StatusCode, e.Errno));
    }

    [Fact]
    public async Task EnsureOk_DeviceError_DmaRequestExceptionWithErrnoAndNoStatus()
    {
        await using var broker = await TestBroker.StartAsync();
        var (session, _, _, device) = await ClaimAsync(broker);
        await using var _ = session;
        await using var dma = await device.OpenDmaChannelAsync();
        await dma.MmioWriteAsync(0, 0x80, Iova, 8);
        await dma.MmioWriteAsync(0, 0x88, 0x40f00, 8);  // the 4 KiB device buffer ends at 0x41000
        await dma.MmioWriteAsync(0, 0x90, 0x1000, 8);
        var result = await dma.MmioWriteAsync(0, 0x98, 0x1, 8);

        var e = Assert.Throws<DmaRequestException>(() => result.EnsureOk());

        Assert.Equal((Errno.EIO, "EIO", (StatusCode?)null, result.Tag), (e.Errno, e.Reason, e.StatusCode, e.Tag));
        Assert.True((await dma.MmioReadAsync(0, 0x00)).Ok, "the channel carries on after a device error");
    }

    [Fact]
    public async Task BrokerLost_PendingAndLaterCallsFailAndSessionEndsWithoutHanging()
    {
        var broker = await TestBroker.StartAsync();
        var (session, _, _, device) = await ClaimAsync(broker);
        var dma = await device.OpenDmaChannelAsync();
        Assert.True((await dma.MmioReadAsync(0, 0)).Ok);

        await broker.DisposeAsync();

        var reason = await session.Ended.WaitAsync(TestBroker.Timeout);
        Assert.False(string.IsNullOrEmpty(reason));
        await Assert.ThrowsAnyAsync<BrokerException>(() => dma.MmioReadAsync(0, 0).WaitAsync(TestBroker.Timeout));
        await dma.DisposeAsync().AsTask().WaitAsync(TestBroker.Timeout);
        await session.DisposeAsync().AsTask().WaitAsync(TestBroker.Timeout);
    }
}
