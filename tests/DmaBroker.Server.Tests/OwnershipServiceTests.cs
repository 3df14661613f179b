using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Grpc.Core;
using static DmaBroker.Server.Tests.Errors;

namespace DmaBroker.Server.Tests;

/// <summary>The §3/§4 ownership rules through a real server, with two sessions contending.</summary>
public sealed class OwnershipServiceTests
{
    private const uint EduGroup = 14;          // 0000:08:00.0, vfio-pci, free
    private const uint SwitchGroup = 13;       // 0000:05:00.0, 05:01.0, 06:00.0 (vfio-pci), 07:00.0
    private const uint NvmeGroup = 9;          // 0000:01:00.0, nvme: KERNEL(1)

    [Fact]
    public async Task SetContainer_TwoSessionsContend_SecondGetsEinvalAndOwnerIsFirst()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var two = await TwoSessions.OpenAsync(broker, ContainerType.Type1V2);
        var (a, ca, b, cb) = two;

        await a.SetContainerAsync(EduGroup, ca);
        await Expect(Errno.EINVAL, StatusCode.FailedPrecondition, () => b.SetContainerAsync(EduGroup, cb));

        var group = await broker.Client.GetGroupAsync(EduGroup);
        Assert.Equal((OwnerKind.User, 1u, a.Id, 1ul, DomainKind.User),
            (group.OwnerKind, group.OwnerCount, group.OwnerSession, group.Generation, group.Domain));
        Assert.Equal((true, true), Status(await a.GetGroupStatusAsync(EduGroup)));
        Assert.Equal((false, false), Status(await b.GetGroupStatusAsync(EduGroup)));
    }

    [Fact]
    public async Task BindDevice_GroupOwnedByOtherSession_Eperm()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var two = await TwoSessions.OpenAsync(broker, ContainerType.Iommufd);
        var (a, ca, b, cb) = two;

        await a.BindDeviceAsync("0000:08:00.0", ca);
        await Expect(Errno.EPERM, StatusCode.PermissionDenied, () => b.BindDeviceAsync("0000:08:00.0", cb));
        // A group claim on a group with a device claim fails EPERM even for the same session.
        await Expect(Errno.EPERM, StatusCode.PermissionDenied, () => a.SetContainerAsync(EduGroup, ca));
        await Expect(Errno.EPERM, StatusCode.PermissionDenied, () => b.SetContainerAsync(NvmeGroup, cb));
    }

    [Fact]
    public async Task BindDriver_DmaApiDriverIntoUserOwnedGroup_EbusyAndBrokerKeepsServing()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var a = await broker.Client.OpenSessionAsync("a");
        var ca = await a.CreateContainerAsync(ContainerType.Type1V2);
        await a.SetContainerAsync(SwitchGroup, ca);

        // 0000:07:00.0 is driver-less inside the user-owned group: a DMA-API driver must not bind.
        await Expect(Errno.EBUSY, StatusCode.FailedPrecondition,
            () => broker.Client.Admin.BindDriverAsync("0000:07:00.0", "nvme"));

        var devices = await broker.Client.ListDevicesAsync();
        Assert.Equal("", devices.Devices.Single(d => d.Address == "0000:07:00.0").Driver);
        var group = await broker.Client.GetGroupAsync(SwitchGroup);
        Assert.Equal((OwnerKind.User, 1u, a.Id), (group.OwnerKind, group.OwnerCount, group.OwnerSession));
        // vfio-pci manages DMA itself: it binds without touching ownership.
        var bound = await broker.Client.Admin.BindDriverAsync("0000:07:00.0", "vfio-pci");
        Assert.True(bound.DriverManagedDma);
    }

    [Fact]
    public async Task BindDevice_SameSessionTwoDevicesOfOneGroup_CountsUpThenReleases()
    {
        await using var broker = await TestBroker.StartAsync();
        await broker.Client.Admin.BindDriverAsync("0000:07:00.0", "vfio-pci");
        await using var a = await broker.Client.OpenSessionAsync("a");
        var ca = await a.CreateContainerAsync(ContainerType.Iommufd);

        await a.BindDeviceAsync("0000:06:00.0", ca);
        await a.BindDeviceAsync("0000:07:00.0", ca);
        Assert.Equal(2u, (await broker.Client.GetGroupAsync(SwitchGroup)).OwnerCount);

        await a.UnbindDeviceAsync("0000:06:00.0");
        Assert.Equal((OwnerKind.User, 1u), Owner(await broker.Client.GetGroupAsync(SwitchGroup)));
        await a.UnbindDeviceAsync("0000:07:00.0");
        Assert.Equal((OwnerKind.None, 0u), Owner(await broker.Client.GetGroupAsync(SwitchGroup)));
        await Expect(Errno.EINVAL, StatusCode.FailedPrecondition, () => a.UnbindDeviceAsync("0000:07:00.0"));
    }

    [Fact]
    public async Task UserCalls_MissingOrUnknownToken_Unauthenticated()
    {
        await using var broker = await TestBroker.StartAsync();
        var request = new CreateContainerRequest { Type = ContainerType.Type1V2 };
        await Expect(Errno.EACCES, StatusCode.Unauthenticated, () => Call(() => broker.VfioWithToken(null).CreateContainerAsync(request).ResponseAsync));
        await Expect(Errno.EACCES, StatusCode.Unauthenticated, () => Call(() => broker.VfioWithToken("not-a-token").CreateContainerAsync(request).ResponseAsync));

        var session = await broker.Client.OpenSessionAsync("ended");
        var token = session.Token;
        await session.DisposeAsync();
        await Expect(Errno.EACCES, StatusCode.Unauthenticated, () => Call(() => broker.VfioWithToken(token).CreateContainerAsync(request).ResponseAsync));
    }

    [Theory]
    [InlineData("0000:08:00", Errno.EINVAL, StatusCode.InvalidArgument)]
    [InlineData("zz:00.0", Errno.EINVAL, StatusCode.InvalidArgument)]
    [InlineData("0000:08:20.0", Errno.EINVAL, StatusCode.InvalidArgument)]
    [InlineData("", Errno.EINVAL, StatusCode.InvalidArgument)]
    [InlineData("0000:42:00.0", Errno.ENODEV, StatusCode.NotFound)]
    public async Task BindDevice_BadAddress_ClearErrorAndNoStateChange(string address, Errno errno, StatusCode code)
    {
        await using var broker = await TestBroker.StartAsync();
        await using var a = await broker.Client.OpenSessionAsync("a");
        var ca = await a.CreateContainerAsync(ContainerType.Iommufd);
        var before = await broker.Client.ListGroupsAsync();

        await Expect(errno, code, () => a.BindDeviceAsync(address, ca));

        Assert.Equal(before, await broker.Client.ListGroupsAsync());
    }

    [Fact]
    public async Task VfioCalls_UnknownIdsAndReleasesOfWhatIsNotHeld_SpecErrorsNeverInternal()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var a = await broker.Client.OpenSessionAsync("a");
        var ca = await a.CreateContainerAsync(ContainerType.Type1V2);
        var before = await broker.Client.ListGroupsAsync();

        await Expect(Errno.ENOENT, StatusCode.NotFound, () => a.SetContainerAsync(999, ca));
        await Expect(Errno.ENOENT, StatusCode.NotFound, () => a.SetContainerAsync(EduGroup, 12345));
        await Expect(Errno.ENOENT, StatusCode.NotFound, () => a.GetGroupStatusAsync(999));
        await Expect(Errno.EINVAL, StatusCode.FailedPrecondition, () => a.UnsetContainerAsync(EduGroup));
        await Expect(Errno.EINVAL, StatusCode.FailedPrecondition, () => a.UnbindDeviceAsync("0000:08:00.0"));
        await Expect(Errno.ENODEV, StatusCode.FailedPrecondition, () => a.BindDeviceAsync("0000:07:00.0", ca));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => a.CreateContainerAsync(ContainerType.Unspecified));
        await Expect(Errno.ENOENT, StatusCode.NotFound, () => broker.Client.GetGroupAsync(999));

        Assert.Equal(before, await broker.Client.ListGroupsAsync());
    }

    [Fact]
    public async Task ErrorDetails_CarryErrorInfoWithDomainAndErrno()
    {
        await using var broker = await TestBroker.StartAsync();
        var e = await Assert.ThrowsAsync<RpcException>(() => broker.Client.Raw.Topology.GetGroupAsync(new GetGroupRequest { GroupId = 999 }).ResponseAsync);
        var info = Grpc.Core.RpcExceptionExtensions.GetRpcStatus(e)?.GetDetail<Google.Rpc.ErrorInfo>();
        Assert.NotNull(info);
        Assert.Equal(("ENOENT", "dmabroker", "2"), (info.Reason, info.Domain, info.Metadata["errno"]));
        Assert.Contains("999", e.Status.Detail, StringComparison.Ordinal);
    }

    [Fact]
    public async Task UnsetContainer_ReleasesToDefaultAndNextOwnerGetsNewGeneration()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var two = await TwoSessions.OpenAsync(broker, ContainerType.Type1V2);
        var (a, ca, b, cb) = two;

        await a.SetContainerAsync(EduGroup, ca);
        await a.UnsetContainerAsync(EduGroup);
        var released = await broker.Client.GetGroupAsync(EduGroup);
        Assert.Equal((OwnerKind.None, 0u, 0ul, DomainKind.Default), (released.OwnerKind, released.OwnerCount, released.OwnerSession, released.Domain));

        await b.SetContainerAsync(EduGroup, cb);
        var regranted = await broker.Client.GetGroupAsync(EduGroup);
        Assert.Equal((b.Id, 2ul), (regranted.OwnerSession, regranted.Generation));
    }

    /// <summary>Sessions "a" and "b", each with a container of one type: the two contenders.</summary>
    private sealed record TwoSessions(BrokerSession A, ulong ContainerA, BrokerSession B, ulong ContainerB) : IAsyncDisposable
    {
        public static async Task<TwoSessions> OpenAsync(TestBroker broker, ContainerType type)
        {
            var a = await broker.Client.OpenSessionAsync("a");
            var b = await broker.Client.OpenSessionAsync("b");
            return new TwoSessions(a, await a.CreateContainerAsync(type), b, await b.CreateContainerAsync(type));
        }

        public async ValueTask DisposeAsync()
        {
            await B.DisposeAsync();
            await A.DisposeAsync();
        }
    }

    private static (bool, bool) Status(GroupStatus s) => (s.Viable, s.ContainerSet);

    private static (OwnerKind, uint) Owner(Group g) => (g.OwnerKind, g.OwnerCount);
}
