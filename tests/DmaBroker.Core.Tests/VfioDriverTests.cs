using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Core.Tests;

/// <summary>SPEC §4 (VFIO group and device flows) and §5 (sessions end and release) through <see cref="Broker"/>.</summary>
public sealed class VfioDriverTests : IAsyncLifetime, IAsyncDisposable
{
    // Default topology: group 13 = switch ports 05:00.0, 05:01.0 + edu 06:00.0 (vfio-pci) + edu 07:00.0 (no driver);
    // group 14 = edu 08:00.0 (vfio-pci); group 10 = NIC pair on ixgbe (KERNEL(2)); group 9 = nvme (KERNEL(1)).
    private const uint SwitchGroup = 13;
    private const uint EduGroup = 14;
    private const uint NicGroup = 10;
    private static readonly PciAddress SwitchEdu = PciAddress.Parse("0000:06:00.0");
    private static readonly PciAddress SwitchEduNoDriver = PciAddress.Parse("0000:07:00.0");
    private static readonly PciAddress Edu = PciAddress.Parse("0000:08:00.0");
    private static readonly PciAddress Nic = PciAddress.Parse("0000:02:00.0");

    private readonly FakeTimeProvider _time = new();
    private readonly Broker _broker;
    private readonly Session _a;
    private readonly Session _b;

    public VfioDriverTests()
    {
        _broker = new Broker(TopologyDocument.Default(), null, _time);
        _a = _broker.Sessions.Open("A");
        _b = _broker.Sessions.Open("B");
    }

    public Task InitializeAsync() => Task.CompletedTask;

    Task IAsyncLifetime.DisposeAsync() => DisposeAsync().AsTask();

    public async ValueTask DisposeAsync()
    {
        CoreState.AssertInvariants(_broker);
        await _broker.DisposeAsync();
    }

    private VfioDriver Vfio => _broker.Vfio;

    private Container NewContainer(Session session, ContainerType type = ContainerType.Type1v2) => Vfio.CreateContainer(session, type);

    private static Task End(Broker broker, Session session) =>
        broker.Sessions.EndAsync(session, SessionEndReason.ClientClosed).WaitAsync(CoreState.Timeout);

    // --- group/container flow ---

    [Fact]
    public void SetContainer_FreeGroup_ClaimsAndAttachesContainerDomain()
    {
        var container = NewContainer(_a);
        Assert.False(container.HasIommu);

        Vfio.SetContainer(_a, EduGroup, container.Id);

        var group = CoreState.Group(_broker, EduGroup);
        Assert.Equal((OwnerKind.User, 1, _a.Id, 1ul, DomainKind.User),
            (group.OwnerKind, group.OwnerCount, group.OwnerSession, group.Generation, group.Domain));
        Assert.True(container.HasIommu);
        Assert.Equal(new GroupStatus(Viable: true, ContainerSet: true), Vfio.GetGroupStatus(_a, EduGroup));
    }

    [Fact]
    public void SetContainer_GroupHasContainerOfOtherSession_FailsEinval()
    {
        Vfio.SetContainer(_a, EduGroup, NewContainer(_a).Id);
        var theirs = NewContainer(_b);

        CoreState.AssertRejected(_broker, Errno.EINVAL, () => Vfio.SetContainer(_b, EduGroup, theirs.Id));
    }

    [Fact]
    public void SetContainer_GroupHasOwnContainer_FailsEinval()
    {
        var first = NewContainer(_a);
        var second = NewContainer(_a);
        Vfio.SetContainer(_a, EduGroup, first.Id);

        CoreState.AssertRejected(_broker, Errno.EINVAL, () => Vfio.SetContainer(_a, EduGroup, first.Id));
        CoreState.AssertRejected(_broker, Errno.EINVAL, () => Vfio.SetContainer(_a, EduGroup, second.Id));
    }

    [Theory]
    [InlineData(NicGroup)]
    [InlineData(9u)]
    public void SetContainer_KernelOwnedGroup_FailsEperm(uint groupId)
    {
        var container = NewContainer(_a);

        var e = CoreState.AssertRejected(_broker, Errno.EPERM, () => Vfio.SetContainer(_a, groupId, container.Id));

        Assert.Equal(ErrorKind.PermissionDenied, e.Kind);
    }

    [Fact]
    public void SetContainer_GroupDeviceClaimedBySameSession_FailsEperm()
    {
        var container = NewContainer(_a, ContainerType.Iommufd);
        Vfio.BindDevice(_a, Edu, container.Id);

        // A group claim refuses any existing owner, even this session (iommu_group_claim_dma_owner).
        CoreState.AssertRejected(_broker, Errno.EPERM, () => Vfio.SetContainer(_a, EduGroup, container.Id));
    }

    [Fact]
    public void SetContainer_UnknownGroupOrForeignContainer_FailsEnoent()
    {
        var mine = NewContainer(_a);
        var theirs = NewContainer(_b);

        var unknownGroup = CoreState.AssertRejected(_broker, Errno.ENOENT, () => Vfio.SetContainer(_a, 99, mine.Id));
        CoreState.AssertRejected(_broker, Errno.ENOENT, () => Vfio.SetContainer(_a, EduGroup, theirs.Id));

        Assert.Equal(ErrorKind.NotFound, unknownGroup.Kind);
    }

    [Fact]
    public void SetContainer_TwoGroupsIntoOneContainer_BothAttachToIt()
    {
        var container = NewContainer(_a);

        Vfio.SetContainer(_a, EduGroup, container.Id);
        Vfio.SetContainer(_a, SwitchGroup, container.Id);

        Assert.Same(container, _broker.Table.GetGroup(EduGroup).Attached);
        Assert.Same(container, _broker.Table.GetGroup(SwitchGroup).Attached);
        Assert.Equal([SwitchGroup, EduGroup], container.Holdings().Groups.Select(g => g.Id).Order());
    }

    [Fact]
    public void GetGroupStatus_EachOwnership_ReportsViableAndContainerSetForThisSession()
    {
        var mine = NewContainer(_a);
        var theirs = NewContainer(_b, ContainerType.Iommufd);
        Vfio.SetContainer(_a, EduGroup, mine.Id);
        Vfio.BindDevice(_b, SwitchEdu, theirs.Id);

        Assert.Equal(new GroupStatus(true, true), Vfio.GetGroupStatus(_a, EduGroup));
        Assert.Equal(new GroupStatus(false, false), Vfio.GetGroupStatus(_b, EduGroup));
        Assert.Equal(new GroupStatus(true, false), Vfio.GetGroupStatus(_a, 15));
        Assert.Equal(new GroupStatus(false, false), Vfio.GetGroupStatus(_a, NicGroup));
        Assert.Equal(new GroupStatus(false, false), Vfio.GetGroupStatus(_a, SwitchGroup));
        // SPEC §4: viable only when unowned or this session's container is *set*; a device claim sets none.
        Assert.Equal(new GroupStatus(false, false), Vfio.GetGroupStatus(_b, SwitchGroup));
        Assert.Equal(Errno.ENOENT, CoreState.ErrnoOf(() => Vfio.GetGroupStatus(_a, 99)));
    }

    [Fact]
    public void UnsetContainer_NoContainerSet_FailsEinval()
    {
        CoreState.AssertRejected(_broker, Errno.EINVAL, () => Vfio.UnsetContainer(_a, EduGroup));
        CoreState.AssertRejected(_broker, Errno.EINVAL, () => Vfio.UnsetContainer(_a, NicGroup));
    }

    [Fact]
    public void UnsetContainer_OtherSessionsContainer_FailsEinval()
    {
        Vfio.SetContainer(_a, EduGroup, NewContainer(_a).Id);

        CoreState.AssertRejected(_broker, Errno.EINVAL, () => Vfio.UnsetContainer(_b, EduGroup));
    }

    [Fact]
    public void BindDevice_GroupHeldThroughContainer_FailsEbusyAndReverseOrderEperm()
    {
        // Linux's vfio_device_block_group: one device is not held through the group path and the
        // device path at once. Group path first: the device-path bind is EBUSY, nothing changes.
        var container = NewContainer(_a);
        Vfio.SetContainer(_a, EduGroup, container.Id);
        CoreState.AssertRejected(_broker, Errno.EBUSY, () => Vfio.BindDevice(_a, Edu, container.Id));
        Assert.Equal(1, CoreState.Group(_broker, EduGroup).OwnerCount);
        Vfio.UnsetContainer(_a, EduGroup);

        // Device path first: the group claim is EPERM, as §3 says for a group already owned, even by the same session.
        var ioas = NewContainer(_a, ContainerType.Iommufd);
        Vfio.BindDevice(_a, Edu, ioas.Id);
        CoreState.AssertRejected(_broker, Errno.EPERM, () => Vfio.SetContainer(_a, EduGroup, container.Id));
        Vfio.UnbindDevice(_a, Edu);
        Assert.Equal((OwnerKind.None, DomainKind.Default), (CoreState.Group(_broker, EduGroup).OwnerKind, CoreState.Group(_broker, EduGroup).Domain));
    }

    [Fact]
    public void UnsetContainer_LastGroup_ReleasesGroupAndEmptiesContainer()
    {
        var container = NewContainer(_a);
        Vfio.SetContainer(_a, EduGroup, container.Id);
        Vfio.SetContainer(_a, 15, container.Id);
        CoreState.AssertRejected(_broker, Errno.EBUSY, () => Vfio.DestroyContainer(_a, container.Id));

        Vfio.UnsetContainer(_a, EduGroup);
        Assert.True(container.HasIommu);
        Vfio.UnsetContainer(_a, 15);

        Assert.Empty(container.Holdings().Groups);
        Assert.False(container.HasIommu);
        foreach (var id in new[] { EduGroup, 15u })
        {
            var group = CoreState.Group(_broker, id);
            Assert.Equal((OwnerKind.None, 0, 0ul, DomainKind.Default, 1ul),
                (group.OwnerKind, group.OwnerCount, group.OwnerSession, group.Domain, group.Generation));
        }
        Vfio.DestroyContainer(_a, container.Id);
        Assert.Equal(0, _broker.GetStats().Containers);
    }

    [Fact]
    public void SetContainer_AfterRelease_BumpsGeneration()
    {
        var container = NewContainer(_a);
        Vfio.SetContainer(_a, EduGroup, container.Id);
        Vfio.UnsetContainer(_a, EduGroup);
        var theirs = NewContainer(_b);

        Vfio.SetContainer(_b, EduGroup, theirs.Id);

        Assert.Equal((2ul, _b.Id), (CoreState.Group(_broker, EduGroup).Generation, CoreState.Group(_broker, EduGroup).OwnerSession));
    }

    [Fact]
    public void DestroyContainer_UnknownOrOtherSessions_FailsEnoent()
    {
        var theirs = NewContainer(_b);

        CoreState.AssertRejected(_broker, Errno.ENOENT, () => Vfio.DestroyContainer(_a, theirs.Id));
        CoreState.AssertRejected(_broker, Errno.ENOENT, () => Vfio.DestroyContainer(_a, 12345));
        Vfio.DestroyContainer(_b, theirs.Id);
        CoreState.AssertRejected(_broker, Errno.ENOENT, () => Vfio.DestroyContainer(_b, theirs.Id));
    }

    // --- device flow ---

    [Fact]
    public void BindDevice_TwoDevicesOfOneGroup_CountsUpAndUnbindReleasesOneEach()
    {
        _broker.Table.BindDriver(SwitchEduNoDriver, Drivers.VfioPci);
        var container = NewContainer(_a, ContainerType.Iommufd);

        Vfio.BindDevice(_a, SwitchEdu, container.Id);
        Vfio.BindDevice(_a, SwitchEduNoDriver, container.Id);

        var group = CoreState.Group(_broker, SwitchGroup);
        Assert.Equal((OwnerKind.User, 2, _a.Id, 1ul, DomainKind.User),
            (group.OwnerKind, group.OwnerCount, group.OwnerSession, group.Generation, group.Domain));

        Vfio.UnbindDevice(_a, SwitchEdu);
        group = CoreState.Group(_broker, SwitchGroup);
        Assert.Equal((OwnerKind.User, 1, DomainKind.User), (group.OwnerKind, group.OwnerCount, group.Domain));
        CoreState.AssertRejected(_broker, Errno.EBUSY, () => Vfio.DestroyContainer(_a, container.Id));

        Vfio.UnbindDevice(_a, SwitchEduNoDriver);
        group = CoreState.Group(_broker, SwitchGroup);
        Assert.Equal((OwnerKind.None, 0, 0ul, DomainKind.Default, 1ul),
            (group.OwnerKind, group.OwnerCount, group.OwnerSession, group.Domain, group.Generation));
        Assert.Equal((0, 0), (container.Holdings().Groups.Length, container.Holdings().Devices.Length));
        Vfio.DestroyContainer(_a, container.Id);
    }

    [Fact]
    public void BindDevice_GroupOwnedByOtherSession_FailsEperm()
    {
        _broker.Table.BindDriver(SwitchEduNoDriver, Drivers.VfioPci);
        Vfio.BindDevice(_a, SwitchEdu, NewContainer(_a, ContainerType.Iommufd).Id);
        var theirs = NewContainer(_b, ContainerType.Iommufd);

        CoreState.AssertRejected(_broker, Errno.EPERM, () => Vfio.BindDevice(_b, SwitchEduNoDriver, theirs.Id));
        CoreState.AssertRejected(_broker, Errno.EPERM, () => Vfio.BindDevice(_b, SwitchEdu, theirs.Id));
    }

    [Fact]
    public void BindDevice_GroupSetToOtherSessionsContainer_FailsEperm()
    {
        Vfio.SetContainer(_a, EduGroup, NewContainer(_a).Id);
        var theirs = NewContainer(_b, ContainerType.Iommufd);

        CoreState.AssertRejected(_broker, Errno.EPERM, () => Vfio.BindDevice(_b, Edu, theirs.Id));
    }

    [Fact]
    public void BindDevice_DeviceNotOnVfioPci_FailsEnodev()
    {
        var container = NewContainer(_a, ContainerType.Iommufd);

        CoreState.AssertRejected(_broker, Errno.ENODEV, () => Vfio.BindDevice(_a, SwitchEduNoDriver, container.Id));
        CoreState.AssertRejected(_broker, Errno.ENODEV, () => Vfio.BindDevice(_a, Nic, container.Id));
    }

    [Fact]
    public void BindDevice_AlreadyBoundBySameSession_FailsEinval()
    {
        var container = NewContainer(_a, ContainerType.Iommufd);
        Vfio.BindDevice(_a, Edu, container.Id);

        CoreState.AssertRejected(_broker, Errno.EINVAL, () => Vfio.BindDevice(_a, Edu, container.Id));
    }

    [Fact]
    public void BindDevice_GroupAttachedToAnotherContainer_FailsEbusy()
    {
        _broker.Table.BindDriver(SwitchEduNoDriver, Drivers.VfioPci);
        var first = NewContainer(_a, ContainerType.Iommufd);
        var second = NewContainer(_a, ContainerType.Iommufd);
        Vfio.BindDevice(_a, SwitchEdu, first.Id);

        CoreState.AssertRejected(_broker, Errno.EBUSY, () => Vfio.BindDevice(_a, SwitchEduNoDriver, second.Id));
    }

    [Fact]
    public void UnbindDevice_NotBoundByThisSession_FailsEinval()
    {
        Vfio.BindDevice(_a, Edu, NewContainer(_a, ContainerType.Iommufd).Id);

        CoreState.AssertRejected(_broker, Errno.EINVAL, () => Vfio.UnbindDevice(_b, Edu));
        CoreState.AssertRejected(_broker, Errno.EINVAL, () => Vfio.UnbindDevice(_a, SwitchEdu));
        Assert.Equal(1, CoreState.Group(_broker, EduGroup).OwnerCount);
    }

    // --- kernel side against user ownership ---

    [Fact]
    public void BindDriver_DmaApiDriverIntoUserOwnedGroup_FailsEbusyAndStaysUnbound()
    {
        Vfio.SetContainer(_a, SwitchGroup, NewContainer(_a).Id);

        CoreState.AssertRejected(_broker, Errno.EBUSY, () => _broker.Table.BindDriver(SwitchEduNoDriver, "ixgbe"));

        Assert.Null(_broker.Journal.Current.Devices[SwitchEduNoDriver].Driver);
        _broker.Table.BindDriver(SwitchEduNoDriver, Drivers.PciStub);
        Assert.Equal((OwnerKind.User, 1), (CoreState.Group(_broker, SwitchGroup).OwnerKind, CoreState.Group(_broker, SwitchGroup).OwnerCount));
    }

    [Fact]
    public void UnbindDriver_DeviceBoundBySession_FailsEbusy()
    {
        Vfio.BindDevice(_a, Edu, NewContainer(_a, ContainerType.Iommufd).Id);

        CoreState.AssertRejected(_broker, Errno.EBUSY, () => _broker.Table.UnbindDriver(Edu));
    }

    [Fact]
    public void UnbindDriver_LastDmaApiDriver_MakesGroupClaimable()
    {
        var nvme = PciAddress.Parse("0000:01:00.0");
        var container = NewContainer(_a);
        CoreState.AssertRejected(_broker, Errno.EPERM, () => Vfio.SetContainer(_a, 9, container.Id));

        _broker.Table.UnbindDriver(nvme);
        Vfio.SetContainer(_a, 9, container.Id);

        Assert.Equal((OwnerKind.User, _a.Id), (CoreState.Group(_broker, 9).OwnerKind, CoreState.Group(_broker, 9).OwnerSession));
    }

    // --- sessions ---

    [Fact]
    public async Task EndAsync_SessionHoldingGroupsAndDevices_ReleasesAllAndPublishesToWatcher()
    {
        using var watcher = _broker.Journal.Watch();
        var set = NewContainer(_a);
        var bound = NewContainer(_a, ContainerType.Iommufd);
        NewContainer(_a);
        Vfio.SetContainer(_a, EduGroup, set.Id);
        Vfio.BindDevice(_a, SwitchEdu, bound.Id);
        Vfio.BindDevice(_a, PciAddress.Parse("0000:09:00.0"), bound.Id);
        Assert.Equal(3, _broker.GetStats().UserOwnedGroups);
        var heldAt = _broker.Journal.Current.Revision;

        await End(_broker, _a);

        foreach (var id in new[] { EduGroup, SwitchGroup, 15u })
        {
            var group = CoreState.Group(_broker, id);
            Assert.Equal((OwnerKind.None, 0, 0ul, DomainKind.Default), (group.OwnerKind, group.OwnerCount, group.OwnerSession, group.Domain));
        }
        Assert.Equal(new BrokerStats(1, 0, 0, 1, 2, 1, 0, 0, 0, 0), _broker.GetStats());
        Assert.Equal(SessionEndReason.ClientClosed, _a.EndReason);

        // The watcher saw the claims and then each release, in revision order.
        var released = new HashSet<uint>();
        var lastRevision = 0ul;
        await using var events = watcher.ReadAllAsync().GetAsyncEnumerator();
        while (released.Count < 3)
        {
            Assert.True(await events.MoveNextAsync().AsTask().WaitAsync(CoreState.Timeout));
            var ev = events.Current;
            Assert.True(ev.Revision > lastRevision, $"revision {ev.Revision} after {lastRevision}");
            lastRevision = ev.Revision;
            if (ev is { Revision: var r, Change: GroupChanged { Group: { OwnerKind: OwnerKind.None, Domain: DomainKind.Default } g } } && r > heldAt)
                released.Add(g.Id);
        }
        Assert.Equal([SwitchGroup, EduGroup, 15u], released.Order());
    }

    [Fact]
    public async Task EndAsync_CalledTwice_RunsTeardownOnce()
    {
        Vfio.SetContainer(_a, EduGroup, NewContainer(_a).Id);

        var first = _broker.Sessions.EndAsync(_a, SessionEndReason.ClientClosed);
        var second = _broker.Sessions.EndAsync(_a, SessionEndReason.Revoked);
        await first.WaitAsync(CoreState.Timeout);

        Assert.Same(first, second);
        Assert.Equal(SessionEndReason.ClientClosed, _a.EndReason);
        Assert.Equal(1, _broker.Sessions.Counts.Closed);
    }

    [Fact]
    public void EndInlineAsync_NothingInFlight_ReleasedAndPublishedBeforeItReturns()
    {
        Vfio.SetContainer(_a, EduGroup, NewContainer(_a).Id);

        var ending = _broker.Sessions.EndInlineAsync(_a, SessionEndReason.ConnectionLost);

        // The whole teardown ran on this thread, before the call returned: nothing was queued
        // behind other work, and the release is in the journal already.
        Assert.True(ending.IsCompletedSuccessfully);
        Assert.Equal(OwnerKind.None, CoreState.Group(_broker, EduGroup).OwnerKind);
        Assert.Contains(_broker.Journal.Recent(8), ev => ev.Change is SessionEnded { Reason: "connection lost" } ended && ended.SessionId == _a.Id);
        Assert.Same(ending, _broker.Sessions.EndAsync(_a, SessionEndReason.Revoked));
        Assert.Equal(SessionEndReason.ConnectionLost, _a.EndReason);
    }

    public static TheoryData<string> UserCalls => ["GetGroupStatus", "CreateContainer", "DestroyContainer", "SetContainer", "UnsetContainer", "BindDevice", "UnbindDevice", "Enter"];

    [Theory]
    [MemberData(nameof(UserCalls))]
    public async Task UserCall_AfterSessionEnded_FailsUnauthenticated(string call)
    {
        var container = NewContainer(_a, ContainerType.Iommufd);
        await End(_broker, _a);

        var e = Assert.Throws<ErrnoException>(() => Invoke(call, container.Id));

        Assert.Equal(ErrorKind.Unauthenticated, e.Kind);
        Assert.Equal(ErrorKind.Unauthenticated, Assert.Throws<ErrnoException>(() => _broker.Sessions.Authenticate(_a.Token)).Kind);
        Assert.Equal(Errno.ENOENT, CoreState.ErrnoOf(() => _broker.Sessions.Find(_a.Id)));
    }

    private void Invoke(string call, ulong containerId)
    {
        switch (call)
        {
            case "GetGroupStatus": Vfio.GetGroupStatus(_a, EduGroup); break;
            case "CreateContainer": Vfio.CreateContainer(_a, ContainerType.Type1v2); break;
            case "DestroyContainer": Vfio.DestroyContainer(_a, containerId); break;
            case "SetContainer": Vfio.SetContainer(_a, EduGroup, containerId); break;
            case "UnsetContainer": Vfio.UnsetContainer(_a, EduGroup); break;
            case "BindDevice": Vfio.BindDevice(_a, Edu, containerId); break;
            case "UnbindDevice": Vfio.UnbindDevice(_a, Edu); break;
            case "Enter": _a.Enter().Dispose(); break;
            default: throw new ArgumentException(call, nameof(call));
        }
    }

    [Theory]
    [InlineData(null)]
    [InlineData("")]
    [InlineData("not-a-token")]
    public void Authenticate_MissingOrUnknownToken_FailsUnauthenticated(string? token)
    {
        Assert.Equal(ErrorKind.Unauthenticated, Assert.Throws<ErrnoException>(() => _broker.Sessions.Authenticate(token)).Kind);
        Assert.Same(_a, _broker.Sessions.Authenticate(_a.Token));
    }

    [Fact]
    public void Open_TwoSessions_GetDistinctIdsAndLongRandomTokens()
    {
        Assert.NotEqual(_a.Id, _b.Id);
        Assert.NotEqual(_a.Token, _b.Token);
        // 256 random bits in base64url: 43 characters, well over SPEC §5's 128 bits.
        Assert.Equal(43, _a.Token.Length);
    }

    [Fact]
    public async Task Lease_NothingHeardForTtl_EndsSessionAndReleasesItsGroups()
    {
        Vfio.SetContainer(_a, EduGroup, NewContainer(_a).Id);
        _time.Advance(_broker.Sessions.Options.LeaseTtl - TimeSpan.FromMilliseconds(1));
        Assert.Null(_a.EndReason);

        _time.Advance(TimeSpan.FromMilliseconds(1));

        Assert.Equal(SessionEndReason.LeaseExpired, _a.EndReason);
        await End(_broker, _a);
        Assert.Equal(OwnerKind.None, CoreState.Group(_broker, EduGroup).OwnerKind);
        Assert.Equal(ErrorKind.Unauthenticated, Assert.Throws<ErrnoException>(() => Vfio.GetGroupStatus(_a, EduGroup)).Kind);
    }

    [Fact]
    public async Task Touch_BeforeTtl_RenewsLease()
    {
        var ttl = _broker.Sessions.Options.LeaseTtl;
        _time.Advance(ttl - TimeSpan.FromMilliseconds(100));
        _broker.Sessions.Touch(_a);

        _time.Advance(ttl - TimeSpan.FromMilliseconds(1));

        Assert.Null(_a.EndReason);
        Assert.Equal(SessionEndReason.LeaseExpired, _b.EndReason);
        // B's teardown runs on the pool and sets timers of its own; the fake clock's Advance hands
        // due timers to whichever thread is already firing them, so let it finish first.
        await End(_broker, _b);
        Vfio.SetContainer(_a, EduGroup, NewContainer(_a).Id);
        _time.Advance(TimeSpan.FromMilliseconds(1));
        Assert.Equal(SessionEndReason.LeaseExpired, _a.EndReason);
        await End(_broker, _a);
        Assert.Equal(OwnerKind.None, CoreState.Group(_broker, EduGroup).OwnerKind);
    }

    [Fact]
    public async Task Lease_RenewedAfterItFellDueButBeforeItsTimerRan_SessionLivesOn()
    {
        // The broker fell behind: the lease's timer fell due, but its callback ran only after a
        // ping that had been waiting in the same queue renewed the lease.
        var time = new LateTimers();
        await using var broker = new Broker(TopologyDocument.Default(), null, time);
        var session = broker.Sessions.Open();
        var ttl = broker.Sessions.Options.LeaseTtl;
        time.Advance(ttl);
        broker.Sessions.Touch(session);

        time.RunDue();

        Assert.Null(session.EndReason);
        // The renewal re-armed the lease: a TTL later without another, it runs out.
        time.Advance(ttl - TimeSpan.FromMilliseconds(1));
        time.RunDue();
        Assert.Null(session.EndReason);
        time.Advance(TimeSpan.FromMilliseconds(1));
        time.RunDue();
        Assert.Equal(SessionEndReason.LeaseExpired, session.EndReason);
        await End(broker, session);
    }

    /// <summary>A fake clock whose timers, when they fall due, wait (as behind a busy queue) until the test runs them.</summary>
    private sealed class LateTimers : FakeTimeProvider
    {
        private readonly List<Action> _due = [];

        public override ITimer CreateTimer(TimerCallback callback, object? state, TimeSpan dueTime, TimeSpan period) =>
            base.CreateTimer(s =>
            {
                lock (_due)
                    _due.Add(() => callback(s));
            }, state, dueTime, period);

        public void RunDue()
        {
            Action[] due;
            lock (_due)
            {
                due = [.. _due];
                _due.Clear();
            }
            foreach (var run in due)
                run();
        }
    }

    [Fact]
    public async Task Touch_AfterSessionEnded_DoesNotRevive()
    {
        await End(_broker, _a);

        _broker.Sessions.Touch(_a);
        _time.Advance(_broker.Sessions.Options.LeaseTtl);

        Assert.Equal(SessionEndReason.ClientClosed, _a.EndReason);
        Assert.Equal(ErrorKind.Unauthenticated, Assert.Throws<ErrnoException>(() => _broker.Sessions.Authenticate(_a.Token)).Kind);
    }

    [Fact]
    public async Task Lease_ConfiguredTtl_IsUsed()
    {
        var time = new FakeTimeProvider();
        var options = new BrokerOptions { Sessions = new SessionOptions { LeaseTtl = TimeSpan.FromSeconds(10) } };
        await using var broker = new Broker(TopologyDocument.Default(), options, time);
        var session = broker.Sessions.Open();

        time.Advance(TimeSpan.FromSeconds(9));
        Assert.Null(session.EndReason);
        time.Advance(TimeSpan.FromSeconds(1));

        Assert.Equal(SessionEndReason.LeaseExpired, session.EndReason);
        await End(broker, session);
        Assert.Equal(0, broker.Sessions.Counts.Live);
    }

    [Fact]
    public async Task RevokeAsync_LiveSession_EndsItAndReleasesEverything()
    {
        Vfio.SetContainer(_a, EduGroup, NewContainer(_a).Id);
        Vfio.BindDevice(_a, SwitchEdu, NewContainer(_a, ContainerType.Iommufd).Id);

        await _broker.Sessions.RevokeAsync(_a.Id, "maintenance").WaitAsync(CoreState.Timeout);

        Assert.Equal((SessionEndReason.Revoked, "maintenance"), (_a.EndReason, _a.EndMessage));
        Assert.Equal(0, _broker.GetStats().UserOwnedGroups);
        Assert.Equal(0, _broker.GetStats().Containers);
        Assert.Equal(Errno.ENOENT, CoreState.ErrnoOf(() => _broker.Sessions.RevokeAsync(_a.Id, null)));
        Assert.Equal(Errno.ENOENT, CoreState.ErrnoOf(() => _broker.Sessions.RevokeAsync(999, null)));
    }

    [Fact]
    public async Task EndAsync_InFlightOperation_WaitsForItBeforeReleasing()
    {
        Vfio.SetContainer(_a, EduGroup, NewContainer(_a).Id);
        var scope = _a.Enter();

        var ending = _broker.Sessions.EndAsync(_a, SessionEndReason.ConnectionLost);
        await _a.Ending.WhenCanceled().WaitAsync(CoreState.Timeout);

        // No new operation is admitted, and the group stays held while the operation runs.
        Assert.Equal(ErrorKind.Unauthenticated, Assert.Throws<ErrnoException>(() => Vfio.GetGroupStatus(_a, EduGroup)).Kind);
        Assert.False(ending.IsCompleted);
        Assert.Equal(OwnerKind.User, CoreState.Group(_broker, EduGroup).OwnerKind);

        scope.Dispose();
        await ending.WaitAsync(CoreState.Timeout);
        Assert.Equal(OwnerKind.None, CoreState.Group(_broker, EduGroup).OwnerKind);
    }

    [Fact]
    public async Task DisposeAsync_Broker_EndsEverySessionAndRefusesNewOnes()
    {
        var time = new FakeTimeProvider();
        var broker = new Broker(TopologyDocument.Default(), null, time);
        var session = broker.Sessions.Open();
        broker.Vfio.SetContainer(session, EduGroup, broker.Vfio.CreateContainer(session, ContainerType.Type1v2).Id);

        await broker.DisposeAsync().AsTask().WaitAsync(CoreState.Timeout);

        Assert.Equal(SessionEndReason.Shutdown, session.EndReason);
        Assert.Equal(OwnerKind.None, CoreState.Group(broker, EduGroup).OwnerKind);
        Assert.Equal(Errno.EBUSY, CoreState.ErrnoOf(() => broker.Sessions.Open()));
    }

    // --- watch ---

    [Fact]
    public async Task Watch_BufferOverflows_PublishersNeverBlockAndWatcherGetsFreshSnapshot()
    {
        await using var broker = new Broker(TopologyDocument.Default(), new BrokerOptions { WatchBuffer = 4 }, new FakeTimeProvider());
        using var watcher = broker.Journal.Watch();
        var session = broker.Sessions.Open();
        var container = broker.Vfio.CreateContainer(session, ContainerType.Type1v2);

        // Far more changes than the buffer holds, all on this thread: a publisher that waited would hang here.
        for (var i = 0; i < 20; i++)
        {
            broker.Vfio.SetContainer(session, EduGroup, container.Id);
            broker.Vfio.UnsetContainer(session, EduGroup);
        }
        broker.Vfio.SetContainer(session, EduGroup, container.Id);

        await using var events = watcher.ReadAllAsync().GetAsyncEnumerator();
        Assert.True(await events.MoveNextAsync().AsTask().WaitAsync(CoreState.Timeout));
        Assert.Equal(1ul, events.Current.Snapshot?.Revision);
        Assert.True(await events.MoveNextAsync().AsTask().WaitAsync(CoreState.Timeout));
        var resync = events.Current.Snapshot;
        Assert.NotNull(resync);
        Assert.Equal(broker.Journal.Current.Revision, resync.Revision);
        Assert.Equal(1, watcher.Resyncs);
        var group = resync.Groups[EduGroup];
        Assert.Equal((OwnerKind.User, 21ul, session.Id), (group.OwnerKind, group.Generation, group.OwnerSession));

        // After the resync the watcher follows changes again, in order.
        broker.Vfio.UnsetContainer(session, EduGroup);
        Assert.True(await events.MoveNextAsync().AsTask().WaitAsync(CoreState.Timeout));
        Assert.Equal(resync.Revision + 1, events.Current.Revision);
        var change = Assert.IsType<GroupChanged>(events.Current.Change);
        Assert.Equal(OwnerKind.None, change.Group.OwnerKind);
    }

    [Fact]
    public async Task Watch_Disposed_StopsReadingAndDetaches()
    {
        var watcher = _broker.Journal.Watch();
        Assert.Equal(1, _broker.GetStats().Watchers);
        await using var events = watcher.ReadAllAsync().GetAsyncEnumerator();
        Assert.True(await events.MoveNextAsync().AsTask().WaitAsync(CoreState.Timeout));

        watcher.Dispose();

        Assert.False(await events.MoveNextAsync().AsTask().WaitAsync(CoreState.Timeout));
        Assert.Equal(0, _broker.GetStats().Watchers);
    }
}

internal static class CancellationTokenExtensions
{
    /// <summary>A task that completes when the token is cancelled.</summary>
    public static Task WhenCanceled(this CancellationToken token)
    {
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        token.Register(() => done.TrySetResult());
        return done.Task;
    }
}
