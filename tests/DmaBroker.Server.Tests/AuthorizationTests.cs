using DmaBroker.Client;
using DmaBroker.Protocol;
using DmaBroker.Protocol.V1;
using Google.Rpc;
using Grpc.Core;
using static DmaBroker.Server.Tests.Errors;

namespace DmaBroker.Server.Tests;

/// <summary>
/// SPEC §12 authorization and quotas through a real listener: each row of the errors table, and
/// sessions that belong to their principal. Every refusal leaves the state as it was.
/// </summary>
public sealed class AuthorizationTests
{
    private const string Alice = "alice-token";
    private const string Bob = "bob-token";
    private const string Root = "root-token";
    private const string Burst = "burst-token";
    private const string AliceDevice = "0000:08:00.0";
    private const string OtherDevice = "0000:09:00.0";

    private static readonly string Auth = $$"""
        {
          "principals": [
            { "name": "token:alice", "token_sha256": "{{SecureBroker.Sha256(Alice)}}", "roles": ["user"],
              "groups": ["0000:08:*"],
              "quotas": { "sessions": 2, "memory_mb": 1, "containers": 2, "mappings": 2, "dma_streams": 1 } },
            { "name": "token:bob", "token_sha256": "{{SecureBroker.Sha256(Bob)}}", "roles": ["user"] },
            { "name": "token:root", "token_sha256": "{{SecureBroker.Sha256(Root)}}", "roles": ["admin"] },
            { "name": "token:burst", "token_sha256": "{{SecureBroker.Sha256(Burst)}}", "roles": ["user"],
              "quotas": { "opens_per_second": 1 } },
            { "name": "anonymous", "roles": ["viewer"] }
          ]
        }
        """;

    private static async Task<uint> GroupOf(BrokerClient client, string address) =>
        (await client.ListDevicesAsync()).Devices.Single(d => d.Address == address).GroupId;

    [Fact]
    public async Task Sessions_OverQuota_ResourceExhaustedEmfile_UntilOneEnds()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        var alice = broker.Connect(Alice);
        var first = await alice.OpenSessionAsync("a1");
        await using var second = await alice.OpenSessionAsync("a2");
        Assert.Equal("token:alice", first.Principal);
        var e = await Expect(Errno.EMFILE, StatusCode.ResourceExhausted, () => alice.OpenSessionAsync("a3"));
        Assert.Contains("token:alice", e.Message, StringComparison.Ordinal);
        // Another principal is not held to alice's quota.
        await using var bob = await broker.Connect(Bob).OpenSessionAsync("b1");
        await first.DisposeAsync();
        await using var third = await alice.OpenSessionAsync("a3");
        Assert.Equal(3u, (await broker.Connect(Root).Admin.GetStatsAsync()).Sessions);
    }

    [Fact]
    public async Task SessionOpen_FasterThanRate_ResourceExhaustedEagainWithRetryInfo()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        var burst = broker.Connect(Burst);
        await using var first = await burst.OpenSessionAsync("b1");
        var e = await Expect(Errno.EAGAIN, StatusCode.ResourceExhausted, () => burst.OpenSessionAsync("b2"));
        var retry = ((RpcException)e.InnerException!).GetRpcStatus()!.GetDetail<RetryInfo>();
        Assert.NotNull(retry);
        var wait = retry.RetryDelay.ToTimeSpan();
        Assert.InRange(wait, TimeSpan.FromMilliseconds(1), TimeSpan.FromSeconds(1));
        Assert.Equal(1u, (await broker.Connect(Root).Admin.GetStatsAsync()).Sessions);
    }

    [Fact]
    public async Task Memory_OverSessionQuota_ResourceExhaustedEnomem()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        await using var session = await broker.Connect(Alice).OpenSessionAsync("mem");
        await session.AllocateAsync(1 << 20);
        await Expect(Errno.ENOMEM, StatusCode.ResourceExhausted, () => session.AllocateAsync(WireConstants.PageSize));
        Assert.Equal(1ul << 20, (await broker.Connect(Root).Admin.GetStatsAsync()).MemoryBytes);
    }

    [Fact]
    public async Task ContainersMappingsAndDmaStreams_OverQuota_ResourceExhaustedEnospc()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        await using var session = await broker.Connect(Alice).OpenSessionAsync("counts");
        var container = await session.NewContainerAsync(ContainerType.Type1V2);
        await session.NewContainerAsync(ContainerType.Iommufd);
        await Expect(Errno.ENOSPC, StatusCode.ResourceExhausted, () => session.NewContainerAsync(ContainerType.Iommufd));

        await container.SetGroupAsync(await GroupOf(broker.Connect(Root), AliceDevice));
        var buffer = await session.AllocateAsync(3 * WireConstants.PageSize);
        await container.MapAsync(buffer, 0x10_0000, size: WireConstants.PageSize);
        await container.MapAsync(buffer, 0x20_0000, offset: WireConstants.PageSize, size: WireConstants.PageSize);
        await Expect(Errno.ENOSPC, StatusCode.ResourceExhausted,
            () => container.MapAsync(buffer, 0x30_0000, offset: 2 * WireConstants.PageSize, size: WireConstants.PageSize));

        await using var device = await session.OpenDeviceAsync(AliceDevice);
        await using var first = await device.OpenDmaChannelAsync();
        (await first.MmioReadAsync(0, 0)).EnsureOk();
        // The broker refuses the stream as it starts: the client sees it on opening, or on the first
        // request when its open message was on the wire before the refusal came back.
        await Expect(Errno.ENOSPC, StatusCode.ResourceExhausted, async () =>
        {
            await using var second = await device.OpenDmaChannelAsync();
            await second.MmioReadAsync(0, 0);
        });
        var stats = await broker.Connect(Root).Admin.GetStatsAsync();
        Assert.Equal((2u, 2u, 1u), (stats.Containers, stats.Mappings, stats.DmaStreams));
    }

    [Fact]
    public async Task Claims_OutsideAllowedGroups_PermissionDeniedEacces_StateUnchanged()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        var root = broker.Connect(Root);
        var otherGroup = await GroupOf(root, OtherDevice);
        await using var session = await broker.Connect(Alice).OpenSessionAsync("outside");
        var container = await session.NewContainerAsync(ContainerType.Type1V2);
        var ioas = await session.NewContainerAsync(ContainerType.Iommufd);
        var before = (await root.ListGroupsAsync()).Revision;
        foreach (var call in new Func<Task>[]
        {
            () => container.SetGroupAsync(otherGroup),
            () => ioas.BindDeviceAsync(OtherDevice),
            () => session.OpenDeviceAsync(OtherDevice),
        })
        {
            var e = await Expect(Errno.EACCES, StatusCode.PermissionDenied, call);
            Assert.Contains("outside the groups", e.Message, StringComparison.Ordinal);
        }
        Assert.Equal(before, (await root.ListGroupsAsync()).Revision);
        // Inside its groups it may claim.
        await container.SetGroupAsync(await GroupOf(root, AliceDevice));
    }

    [Fact]
    public async Task SessionToken_PresentedByAnotherPrincipal_UnauthenticatedLikeAnUnknownToken()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        await using var alice = await broker.Connect(Alice).OpenSessionAsync("victim");
        var bob = broker.Connect(Bob);
        var stolen = new Vfio.VfioClient(Grpc.Core.Interceptors.CallInvokerExtensions.Intercept(
            bob.Raw.Channel.CreateCallInvoker(), m =>
            {
                m.Add("authorization", $"Bearer {Bob}");
                m.Add(WireConstants.SessionTokenHeader, alice.Token);
                return m;
            }));
        var e = await Expect(Errno.EACCES, StatusCode.Unauthenticated,
            () => Call(() => stolen.CreateContainerAsync(new CreateContainerRequest { Type = ContainerType.Type1V2 }).ResponseAsync));
        Assert.Equal("unknown or ended session token", e.Message);
        Assert.Equal(0u, (await broker.Connect(Root).Admin.GetStatsAsync()).Containers);
    }

    [Fact]
    public async Task Revoke_UserOnlyItsOwn_AdminAny()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        var alice = broker.Connect(Alice);
        await using var mine = await alice.OpenSessionAsync("mine");
        await using var bobs = await broker.Connect(Bob).OpenSessionAsync("bobs");
        await Expect(Errno.EACCES, StatusCode.PermissionDenied, () => alice.Admin.RevokeSessionAsync(bobs.Id));
        Assert.False(bobs.Ended.IsCompleted);
        await alice.Admin.RevokeSessionAsync(mine.Id);
        Assert.Contains("token:alice", await mine.Ended.WaitAsync(TestBroker.Timeout), StringComparison.Ordinal);
        await broker.Connect(Root).Admin.RevokeSessionAsync(bobs.Id, "maintenance");
        Assert.Equal("maintenance", await bobs.Ended.WaitAsync(TestBroker.Timeout));
    }

    [Fact]
    public async Task ListSessions_UsersSeeTheirOwn_ViewersAndAdminsSeeAll()
    {
        await using var broker = await SecureBroker.StartAsync(Auth);
        var root = broker.Connect(Root);
        await using var alice = await broker.Connect(Alice).OpenSessionAsync("alice-driver");
        await using var bob = await broker.Connect(Bob).OpenSessionAsync("bob-driver");
        var container = await alice.NewContainerAsync(ContainerType.Type1V2);
        var group = await GroupOf(root, AliceDevice);
        await container.SetGroupAsync(group);
        await alice.AllocateAsync(WireConstants.PageSize);

        var asAlice = await broker.Connect(Alice).Admin.ListSessionsAsync();
        Assert.Equal([alice.Id], asAlice.Select(s => s.SessionId));
        var all = await broker.Connect().Admin.ListSessionsAsync();
        Assert.Equal([alice.Id, bob.Id], all.Select(s => s.SessionId));
        Assert.Equal(all, await root.Admin.ListSessionsAsync(), new SessionIdentity());
        var a = all[0];
        Assert.Equal(("token:alice", "alice-driver", (uint)group, WireConstants.PageSize, 0u),
            (a.Principal, a.ClientName, a.Groups.Single(), a.MemoryBytes, a.DmaStreams));
        Assert.StartsWith("ipv4:127.0.0.1:", a.Peer, StringComparison.Ordinal);
        Assert.Equal("token:bob", all[1].Principal);
        Assert.Empty(all[1].Groups);
    }

    private sealed class SessionIdentity : IEqualityComparer<SessionInfo>
    {
        public bool Equals(SessionInfo? x, SessionInfo? y) => x?.SessionId == y?.SessionId && x?.Principal == y?.Principal;

        public int GetHashCode(SessionInfo obj) => obj.SessionId.GetHashCode();
    }
}
