using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Grpc.Core;
using Microsoft.Extensions.Time.Testing;
using static DmaBroker.Server.Tests.Errors;

namespace DmaBroker.Server.Tests;

/// <summary>§5: the session stream is the identity; however it ends, everything it held is released.</summary>
public sealed class SessionLifecycleTests
{
    private const uint EduGroup = 15;

    [Fact]
    public async Task Open_FirstEventIsOpenedWithIdTokenAndLease()
    {
        await using var broker = await TestBroker.StartAsync(null, "--lease-ttl-ms", "1500");
        using var call = broker.Client.Raw.Session.Open();
        Assert.True(await call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));
        var opened = call.ResponseStream.Current.Opened;
        Assert.NotNull(opened);
        Assert.True(opened.SessionId > 0);
        Assert.Equal(1500u, opened.LeaseTtlMs);
        Assert.True(Convert.FromBase64String(opened.Token.Replace('-', '+').Replace('_', '/') + "=").Length >= 16);
    }

    [Fact]
    public async Task Open_CallCancelled_OwnershipReleasedAndWatcherSeesIt()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var watcher = new Watcher(broker.Client);
        Assert.Equal(WatchEvent.EventOneofCase.Snapshot, (await watcher.NextAsync()).EventCase);
        using var cancel = new CancellationTokenSource();
        using var call = broker.Client.Raw.Session.Open(cancellationToken: cancel.Token);
        Assert.True(await call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));
        var opened = call.ResponseStream.Current.Opened;
        var vfio = broker.VfioWithToken(opened.Token);
        var container = (await vfio.CreateContainerAsync(new CreateContainerRequest { Type = ContainerType.Type1V2 })).ContainerId;
        await vfio.SetContainerAsync(new SetContainerRequest { GroupId = EduGroup, ContainerId = container });
        var claimed = await watcher.WaitForGroupAsync(g => g.Id == EduGroup);
        Assert.Equal((OwnerKind.User, opened.SessionId), (claimed.OwnerKind, claimed.OwnerSession));

        await cancel.CancelAsync();

        var released = await watcher.WaitForGroupAsync(g => g.Id == EduGroup);
        Assert.Equal((OwnerKind.None, 0u, DomainKind.Default), (released.OwnerKind, released.OwnerCount, released.Domain));
        await Expect(Errno.EACCES, StatusCode.Unauthenticated,
            () => Call(() => vfio.CreateContainerAsync(new CreateContainerRequest { Type = ContainerType.Type1V2 }).ResponseAsync));
    }

    [Fact]
    public async Task Dispose_Graceful_ReleasedBeforeDisposeReturns()
    {
        await using var broker = await TestBroker.StartAsync();
        var session = await broker.Client.OpenSessionAsync("graceful");
        await session.SetContainerAsync(EduGroup, await session.CreateContainerAsync(ContainerType.Iommufd));
        await session.DisposeAsync();

        Assert.Equal(OwnerKind.None, (await broker.Client.GetGroupAsync(EduGroup)).OwnerKind);
        Assert.Equal("closed", await session.Ended);
        var stats = await broker.Client.Admin.GetStatsAsync();
        Assert.Equal((0u, 0u, 0u, 1ul, 1ul), (stats.Sessions, stats.Containers, stats.UserOwnedGroups, stats.SessionsOpened, stats.SessionsClosed));
    }

    [Fact]
    public async Task Lease_ClientSilentForTtl_RevokedAndReleased()
    {
        var time = new FakeTimeProvider();
        await using var broker = await TestBroker.StartAsync(time, "--lease-ttl-ms", "3000");
        await using var watcher = new Watcher(broker.Client);
        await watcher.NextAsync();
        // A raw stream that never pings, standing for a hung client.
        using var call = broker.Client.Raw.Session.Open();
        Assert.True(await call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));
        var vfio = broker.VfioWithToken(call.ResponseStream.Current.Opened.Token);
        var container = (await vfio.CreateContainerAsync(new CreateContainerRequest { Type = ContainerType.Type1V2 })).ContainerId;
        await vfio.SetContainerAsync(new SetContainerRequest { GroupId = EduGroup, ContainerId = container });
        await watcher.WaitForGroupAsync(g => g.Id == EduGroup && g.OwnerKind == OwnerKind.User);

        time.Advance(TimeSpan.FromMilliseconds(2999));
        Assert.Equal(OwnerKind.User, (await broker.Client.GetGroupAsync(EduGroup)).OwnerKind);
        time.Advance(TimeSpan.FromMilliseconds(1));

        Assert.True(await call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));
        Assert.Equal("lease expired", call.ResponseStream.Current.Revoked?.Reason);
        await watcher.WaitForGroupAsync(g => g.Id == EduGroup && g.OwnerKind == OwnerKind.None);
    }

    [Fact]
    public async Task RevokeSession_LiveSession_ClientToldAndEverythingReleased()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var session = await broker.Client.OpenSessionAsync("victim");
        await session.SetContainerAsync(EduGroup, await session.CreateContainerAsync(ContainerType.Type1V2));

        await broker.Client.Admin.RevokeSessionAsync(session.Id, "maintenance");

        Assert.Equal(OwnerKind.None, (await broker.Client.GetGroupAsync(EduGroup)).OwnerKind);
        Assert.Equal("maintenance", await session.Ended.WaitAsync(TestBroker.Timeout));
        await Expect(Errno.ENOENT, StatusCode.NotFound,
            () => broker.Client.Admin.RevokeSessionAsync(session.Id));
    }

    [Fact]
    public async Task Hello_NamesTheSession()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var session = await broker.Client.OpenSessionAsync("my-driver");
        var live = Assert.Single(broker.Broker.Sessions.Live);
        Assert.Equal((session.Id, "my-driver"), (live.Id, live.ClientName));
    }

    [Fact]
    public async Task Watch_RevisionsIncreaseByOneAcrossManyChanges()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var watcher = new Watcher(broker.Client);
        var snapshot = await watcher.NextAsync();
        Assert.Equal(18, snapshot.Snapshot.Groups.Count);
        Assert.Equal(23, snapshot.Snapshot.Devices.Count);
        await using var session = await broker.Client.OpenSessionAsync("churn");
        var container = await session.CreateContainerAsync(ContainerType.Type1V2);
        for (var i = 0; i < 20; i++)
        {
            await session.SetContainerAsync(EduGroup, container);
            await session.UnsetContainerAsync(EduGroup);
        }
        // Watcher.NextAsync asserts revision = previous + 1 on every event.
        for (var i = 0; i < 40; i++)
            await watcher.NextAsync();
        Assert.Equal((await broker.Client.ListGroupsAsync()).Revision, watcher.LastRevision);
    }
}
