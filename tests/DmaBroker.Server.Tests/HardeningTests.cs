using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Grpc.Core;
using static DmaBroker.Server.Tests.Errors;

namespace DmaBroker.Server.Tests;

/// <summary>
/// Input no well-behaved client sends: bytes that are not protobuf, messages nested past the
/// parser's limit, methods the broker does not serve. Each gets a clear status with its errno,
/// never UNKNOWN or INTERNAL, and the broker keeps serving.
/// </summary>
public sealed class HardeningTests
{
    private static readonly Marshaller<byte[]> Bytes = Marshallers.Create(b => b, b => b);

    /// <summary>Not protobuf: a field tag with wire type 7, which does not exist.</summary>
    private static readonly byte[] Garbage = [0x0f, 0xff, 0xff, 0xff];

    public static TheoryData<string, string> UnaryMethods()
    {
        var data = new TheoryData<string, string>();
        foreach (var service in new[] { Topology.Descriptor, Kernel.Descriptor, Vfio.Descriptor, Memory.Descriptor })
        {
            foreach (var method in service.Methods.Where(m => !m.IsClientStreaming && !m.IsServerStreaming))
                data.Add(service.FullName, method.Name);
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(UnaryMethods))]
    public async Task Unary_RequestNotProtobuf_InvalidArgumentEinval(string service, string method)
    {
        await using var broker = await TestBroker.StartAsync();
        var call = new Method<byte[], byte[]>(MethodType.Unary, service, method, Bytes, Bytes);
        var e = await Expect(Errno.EINVAL, StatusCode.InvalidArgument,
            () => Call(() => broker.Client.Raw.Channel.CreateCallInvoker().AsyncUnaryCall(call, null, new CallOptions(), Garbage).ResponseAsync));
        Assert.Contains("not a valid", e.Message, StringComparison.Ordinal);
        // Still serving.
        Assert.NotEmpty((await broker.Client.ListGroupsAsync()).Groups);
    }

    [Fact]
    public async Task DmaStream_BatchesNestedPastTheParserLimit_InvalidArgumentEinval()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var session = await broker.Client.OpenSessionAsync("nested");
        var request = new DmaRequest { Tag = 1, Read = new DmaRead { Iova = 0, Length = 1 } };
        for (var depth = 0; depth < 200; depth++)
            request = new DmaRequest { Tag = 1, Batch = new DmaBatch { Requests = { request } } };
        using var stream = session.Raw.Dma.Stream();
        await stream.RequestStream.WriteAsync(request);
        var e = await Assert.ThrowsAsync<RpcException>(() => stream.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(TestBroker.Timeout));
        var error = BrokerException.From(e);
        Assert.Equal((Errno.EINVAL, (StatusCode?)StatusCode.InvalidArgument), (error.Errno, error.StatusCode));
        Assert.Equal(0u, (await broker.Client.Admin.GetStatsAsync()).DmaStreams);
    }

    [Fact]
    public async Task UnknownMethod_UnimplementedWithEnosys()
    {
        await using var broker = await TestBroker.StartAsync();
        var call = new Method<byte[], byte[]>(MethodType.Unary, "dmabroker.v1.Kernel", "FormatDisk", Bytes, Bytes);
        var e = await Expect(Errno.ENOSYS, StatusCode.Unimplemented,
            () => Call(() => broker.Client.Raw.Channel.CreateCallInvoker().AsyncUnaryCall(call, null, new CallOptions(), []).ResponseAsync));
        Assert.Contains("FormatDisk", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task SessionOpen_MalformedFrame_StreamFailsEinvalAndSessionEnds()
    {
        await using var broker = await TestBroker.StartAsync();
        var open = new Method<byte[], byte[]>(MethodType.DuplexStreaming, "dmabroker.v1.Session", "Open", Bytes, Bytes);
        using var call = broker.Client.Raw.Channel.CreateCallInvoker().AsyncDuplexStreamingCall(open, null, new CallOptions());
        await call.RequestStream.WriteAsync(Garbage);
        var e = await Assert.ThrowsAsync<RpcException>(async () =>
        {
            while (await call.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(TestBroker.Timeout))
            {
                // `opened` may come first: the broker answers a stream before it has read anything.
            }
        });
        var error = BrokerException.From(e);
        Assert.Equal((Errno.EINVAL, (StatusCode?)StatusCode.InvalidArgument), (error.Errno, error.StatusCode));
        var stats = await broker.Client.Admin.GetStatsAsync();
        Assert.Equal((0u, 1ul), (stats.Sessions, stats.SessionsClosed));
    }

    /// <summary>Every method of the contract, as descriptors, so a new one is not forgotten above.</summary>
    [Fact]
    public void UnaryMethods_CoverEveryUnaryMethodOfTheContract()
    {
        var all = new[] { Topology.Descriptor, Kernel.Descriptor, Session.Descriptor, Vfio.Descriptor, Memory.Descriptor, Dma.Descriptor }
            .SelectMany(s => s.Methods).Where(m => !m.IsClientStreaming && !m.IsServerStreaming).Select(m => $"{m.Service.FullName}/{m.Name}");
        var covered = UnaryMethods().Select(row => $"{row[0]}/{row[1]}");
        Assert.Equal(all.Order(), covered.Order());
    }
}

/// <summary>Huge strings in arguments: refused at once, quoted only as a prefix, and the caller's connection survives.</summary>
public sealed class LongStringTests
{
    public static TheoryData<int> Lengths() => [33, 50_000, 1_000_000];

    [Theory]
    [MemberData(nameof(Lengths))]
    public async Task LongAddressOrDriver_EinvalWithShortMessage_SessionSurvives(int length)
    {
        await using var broker = await TestBroker.StartAsync();
        await using var session = await broker.Client.OpenSessionAsync("long");
        var huge = new string('A', length);
        var errors = new List<BrokerException>
        {
            await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => broker.Client.Admin.BindDriverAsync(huge, "vfio-pci")),
            await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => broker.Client.Admin.BindDriverAsync("0000:08:00.0", huge)),
            await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => broker.Client.Admin.RemoveDeviceAsync(huge)),
            await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => broker.Client.Admin.AddDeviceAsync(new HotplugDevice("0000:0c:00.0", huge))),
            await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => session.OpenDeviceAsync(huge)),
            await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => broker.Client.Admin.RevokeSessionAsync(session.Id, huge.Length > 256 ? huge : huge + new string('x', 257))),
        };
        Assert.All(errors, e => Assert.True(e.Message.Length < 300, $"message of {e.Message.Length} characters: {e.Message[..Math.Min(e.Message.Length, 300)]}"));
        // The connection and the session are alive: a call on it still works.
        Assert.False(session.Ended.IsCompleted);
        var container = await session.NewContainerAsync(ContainerType.Type1V2);
        Assert.NotEqual(0ul, container.Id);
    }
}
