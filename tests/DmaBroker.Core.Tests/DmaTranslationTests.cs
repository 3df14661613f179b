using DmaBroker.Core.Iommu;
using DmaBroker.Core.Memory;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Core.Tests;

/// <summary>
/// SPEC §6 translation: every page of a device access must be mapped, in the domain attached to the
/// device's group at that instant, with the permission the access needs; otherwise the access
/// faults, writes nothing, and the fault is also posted on the session. DMA never reaches memory
/// outside the session's own.
/// </summary>
public sealed class DmaTranslationTests
{
    private const ulong Page = DmaRig.Page;

    /// <summary>
    /// The IOVA layout every fault row runs on: RW at [0x10000, 0x12000), READ-only at [0x12000, 0x13000)
    /// right after it, WRITE-only at [0x20000, 0x21000); nothing at 0x30000. Backed by one 4-page block.
    /// </summary>
    private const ulong Rw = 0x10000;
    private const ulong ReadOnly = 0x12000;
    private const ulong WriteOnly = 0x20000;
    private const ulong Unmapped = 0x30000;

    private static MemoryBlock MapLayout(DmaRig rig)
    {
        var block = rig.Allocate(4 * Page);
        rig.Session.WriteMemory(block.Vaddr, Enumerable.Range(0, (int)(4 * Page)).Select(i => (byte)(i % 251)).ToArray());
        rig.Map(block.Vaddr, Rw, 2 * Page);
        rig.Map(block.Vaddr + 2 * Page, ReadOnly, Page, read: true, write: false);
        rig.Map(block.Vaddr + 3 * Page, WriteOnly, Page, read: false, write: true);
        return block;
    }

    public enum Op
    {
        Write,
        Read,
    }

    [Theory]
    // UNMAPPED: the page itself, or a later page of the range (nothing of the earlier pages is written)
    [InlineData(ContainerType.Type1v2, Op.Write, Unmapped + 8, 16, Unmapped, FaultReason.Unmapped)]
    [InlineData(ContainerType.Iommufd, Op.Write, Unmapped + 8, 16, Unmapped, FaultReason.Unmapped)]
    [InlineData(ContainerType.Type1v2, Op.Read, Unmapped, 1, Unmapped, FaultReason.Unmapped)]
    [InlineData(ContainerType.Type1v2, Op.Write, WriteOnly + Page - 8, 16, WriteOnly + Page, FaultReason.Unmapped)]
    [InlineData(ContainerType.Iommufd, Op.Write, WriteOnly + Page - 8, 16, WriteOnly + Page, FaultReason.Unmapped)]
    [InlineData(ContainerType.Type1v2, Op.Write, WriteOnly, (int)(2 * Page), WriteOnly + Page, FaultReason.Unmapped)]
    [InlineData(ContainerType.Type1v2, Op.Read, ReadOnly + Page - 1, 2, ReadOnly + Page, FaultReason.Unmapped)]
    [InlineData(ContainerType.Iommufd, Op.Read, ReadOnly + Page - 1, 2, ReadOnly + Page, FaultReason.Unmapped)]
    [InlineData(ContainerType.Type1v2, Op.Write, Rw - 8, 16, Rw - Page, FaultReason.Unmapped)]
    [InlineData(ContainerType.Type1v2, Op.Write, IovaSpace.MsiFirst, 4, IovaSpace.MsiFirst, FaultReason.Unmapped)]
    [InlineData(ContainerType.Type1v2, Op.Write, IovaSpace.ApertureLast - 3, 8, IovaSpace.ApertureLast + 1 - Page, FaultReason.Unmapped)]
    [InlineData(ContainerType.Type1v2, Op.Read, 0xffff_ffff_ffff_fffcul, 8, 0xffff_ffff_ffff_f000ul, FaultReason.Unmapped)]
    // PERMISSION: a write into READ-only, a read from WRITE-only, also when only a later page lacks it
    [InlineData(ContainerType.Type1v2, Op.Write, ReadOnly, 4, ReadOnly, FaultReason.Permission)]
    [InlineData(ContainerType.Iommufd, Op.Write, ReadOnly, 4, ReadOnly, FaultReason.Permission)]
    [InlineData(ContainerType.Type1v2, Op.Read, WriteOnly + 100, 4, WriteOnly, FaultReason.Permission)]
    [InlineData(ContainerType.Iommufd, Op.Read, WriteOnly + 100, 4, WriteOnly, FaultReason.Permission)]
    [InlineData(ContainerType.Type1v2, Op.Write, Rw + Page, (int)(2 * Page), ReadOnly, FaultReason.Permission)]
    [InlineData(ContainerType.Iommufd, Op.Write, ReadOnly - 4, 8, ReadOnly, FaultReason.Permission)]
    public async Task Dma_PageNotMappedForTheAccess_FaultsAtThatPageWritesNothingAndPostsFault(
        ContainerType flavour, Op op, ulong iova, int length, ulong faultIova, FaultReason reason)
    {
        await using var rig = DmaRig.Create(flavour);
        var block = MapLayout(rig);
        var handle = rig.Open();
        var before = DmaRig.Contents(block);
        var buffer = Enumerable.Repeat((byte)0xee, length).ToArray();

        var outcome = op == Op.Write ? handle.DmaWrite(iova, buffer) : handle.DmaRead(iova, buffer);

        var access = op == Op.Write ? DmaAccess.Write : DmaAccess.Read;
        Assert.Equal(DmaOutcome.Faulted(faultIova, access, reason), outcome);
        Assert.Equal(before, DmaRig.Contents(block));
        Assert.All(buffer, b => Assert.Equal(0xee, b)); // a faulting read delivers nothing either
        Assert.Equal([new FaultEvent(handle.Device.Address, faultIova, access, reason)], rig.DrainEvents());
    }

    [Theory]
    [InlineData(ContainerType.Type1v2, Op.Write)]
    [InlineData(ContainerType.Iommufd, Op.Read)]
    public async Task Dma_BusMasterOff_FaultsBusMasterOffAndWritesNothing(ContainerType flavour, Op op)
    {
        await using var rig = DmaRig.Create(flavour);
        var block = MapLayout(rig);
        var handle = rig.Open(busMaster: false);
        var before = DmaRig.Contents(block);
        var buffer = new byte[16];

        var outcome = op == Op.Write ? handle.DmaWrite(Rw + 0x10, buffer) : handle.DmaRead(Rw + 0x10, buffer);

        var access = op == Op.Write ? DmaAccess.Write : DmaAccess.Read;
        Assert.Equal(DmaOutcome.Faulted(Rw, access, FaultReason.BusMasterOff), outcome);
        Assert.Equal(before, DmaRig.Contents(block));
        Assert.Equal([new FaultEvent(handle.Device.Address, Rw, access, FaultReason.BusMasterOff)], rig.DrainEvents());
        Assert.Equal(FaultReason.BusMasterOff, handle.DmaCopy(Rw, Rw + Page, 8).Reason);

        DmaRig.SetBusMaster(handle, on: true);
        Assert.True(handle.DmaWrite(Rw + 0x10, buffer).Ok);
    }

    /// <summary>
    /// No public call leaves an open device's group without its user domain (UnsetContainer and
    /// UnbindDevice refuse while a handle is open), so the detach is made directly, under the
    /// group's lock, as the release path makes it: the group goes BLOCKING.
    /// </summary>
    [Theory]
    [InlineData(ContainerType.Type1v2)]
    [InlineData(ContainerType.Iommufd)]
    public async Task Dma_GroupInBlockingDomain_FaultsBlockedAndWritesNothing(ContainerType flavour)
    {
        await using var rig = DmaRig.Create(flavour);
        var block = MapLayout(rig);
        var handle = rig.Open();
        var group = handle.Device.Group;
        var before = DmaRig.Contents(block);
        lock (group.Sync)
            group.DetachUserDomain();
        Assert.Equal(Topology.DomainKind.Blocking, group.Domain);

        Assert.Equal(DmaOutcome.Faulted(Rw, DmaAccess.Write, FaultReason.Blocked), handle.DmaWrite(Rw + 4, [1, 2, 3]));
        Assert.Equal(DmaOutcome.Faulted(Rw, DmaAccess.Read, FaultReason.Blocked), handle.DmaRead(Rw + 4, new byte[3]));
        Assert.Equal(DmaOutcome.Faulted(Rw, DmaAccess.Read, FaultReason.Blocked), handle.DmaCopy(Rw, Rw + Page, 8));

        Assert.Equal(before, DmaRig.Contents(block));
        Assert.Equal(
            [
                new FaultEvent(handle.Device.Address, Rw, DmaAccess.Write, FaultReason.Blocked),
                new FaultEvent(handle.Device.Address, Rw, DmaAccess.Read, FaultReason.Blocked),
                new FaultEvent(handle.Device.Address, Rw, DmaAccess.Read, FaultReason.Blocked),
            ],
            rig.DrainEvents());
        lock (group.Sync)
            group.AttachUserDomain(rig.Container);
        Assert.True(handle.DmaWrite(Rw + 4, [1, 2, 3]).Ok);
    }

    [Fact]
    public async Task Dma_SessionsDmaFenceReached_FaultsBlockedAndWritesNothing_UntilTheFenceMoves()
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2);
        var block = MapLayout(rig);
        var handle = rig.Open();
        // A cluster store's fence (SPEC §16): a second from now on the broker's clock.
        rig.Session.FenceDmaAt(rig.Clock.GetTimestamp() + rig.Clock.TimestampFrequency);
        rig.Clock.Advance(TimeSpan.FromSeconds(1) - TimeSpan.FromTicks(1));
        Assert.True(handle.DmaWrite(Rw + 4, [1, 2, 3]).Ok);
        var before = DmaRig.Contents(block);
        rig.DrainEvents();

        rig.Clock.Advance(TimeSpan.FromTicks(1));

        Assert.Equal(DmaOutcome.Faulted(Rw, DmaAccess.Write, FaultReason.Blocked), handle.DmaWrite(Rw + 4, [4, 5, 6]));
        Assert.Equal(DmaOutcome.Faulted(Rw, DmaAccess.Read, FaultReason.Blocked), handle.DmaRead(Rw + 4, new byte[3]));
        Assert.Equal(DmaOutcome.Faulted(Rw, DmaAccess.Read, FaultReason.Blocked), handle.DmaCopy(Rw, Rw + Page, 8));
        Assert.Equal(before, DmaRig.Contents(block));
        Assert.Equal(3, rig.DrainEvents().Count(e => e is FaultEvent { Reason: FaultReason.Blocked }));
        // A renewal moves the fence on: DMA goes through again.
        rig.Session.FenceDmaAt(rig.Clock.GetTimestamp() + rig.Clock.TimestampFrequency);
        Assert.True(handle.DmaWrite(Rw + 4, [4, 5, 6]).Ok);
    }

    [Theory]
    [InlineData(Rw, Unmapped, (int)Page, Unmapped, DmaAccess.Write, FaultReason.Unmapped)] // destination unmapped
    [InlineData(Rw, ReadOnly, 16, ReadOnly, DmaAccess.Write, FaultReason.Permission)] // destination READ-only
    [InlineData(Rw, WriteOnly + Page - 8, 16, WriteOnly + Page, DmaAccess.Write, FaultReason.Unmapped)] // destination's second page unmapped
    [InlineData(Rw + Page, WriteOnly, (int)(2 * Page), WriteOnly + Page, DmaAccess.Write, FaultReason.Unmapped)] // source fine across RW into READ-only; destination runs out
    [InlineData(WriteOnly, Rw, 16, WriteOnly, DmaAccess.Read, FaultReason.Permission)] // source WRITE-only
    [InlineData(Unmapped, Rw, 16, Unmapped, DmaAccess.Read, FaultReason.Unmapped)] // source unmapped
    [InlineData(ReadOnly + Page - 8, Rw, 16, ReadOnly + Page, DmaAccess.Read, FaultReason.Unmapped)] // source's second page unmapped
    public async Task DmaCopy_EitherRangeRefused_FaultsBeforeMovingAByte(ulong source, ulong destination, int length, ulong faultIova, DmaAccess access, FaultReason reason)
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2);
        var block = MapLayout(rig);
        var handle = rig.Open();
        var before = DmaRig.Contents(block);

        var outcome = handle.DmaCopy(source, destination, length);

        Assert.Equal(DmaOutcome.Faulted(faultIova, access, reason), outcome);
        Assert.Equal(before, DmaRig.Contents(block));
        Assert.Equal([new FaultEvent(handle.Device.Address, faultIova, access, reason)], rig.DrainEvents());
    }

    [Theory]
    [InlineData(ContainerType.Type1v2)]
    [InlineData(ContainerType.Iommufd)]
    public async Task Dma_AcrossTwoAdjacentMappingsOfSeparateBlocks_SplitsAtTheMappingBoundary(ContainerType flavour)
    {
        await using var rig = DmaRig.Create(flavour);
        var a = rig.Allocate(4 * Page);
        var b = rig.Allocate(2 * Page);
        // IOVA-contiguous, memory not: A's last page, then B's first page.
        rig.Map(a.Vaddr + 3 * Page, 0x50000, Page);
        rig.Map(b.Vaddr, 0x51000, 2 * Page);
        var handle = rig.Open();
        var data = Enumerable.Range(0, (int)(2 * Page)).Select(i => (byte)(i * 13 + 1)).ToArray();

        Assert.True(handle.DmaWrite(0x50800, data).Ok);

        var half = (int)(Page / 2);
        Assert.Equal(data[..half], DmaRig.Contents(a)[(int)(3 * Page + Page / 2)..]);
        Assert.Equal(data[half..], DmaRig.Contents(b)[..(int)(Page + Page / 2)]);
        Assert.All(DmaRig.Contents(a)[..(int)(3 * Page + Page / 2)], x => Assert.Equal(0, x));
        var back = new byte[data.Length];
        Assert.True(handle.DmaRead(0x50800, back).Ok);
        Assert.Equal(data, back);
        // The copy engine across the same boundary, overlapping itself.
        Assert.True(handle.DmaCopy(0x50800, 0x50810, 0x1000).Ok);
        Assert.True(handle.DmaRead(0x50810, back.AsSpan(0, 0x1000)).Ok);
        Assert.Equal(data[..0x1000], back[..0x1000]);
        Assert.Empty(rig.DrainEvents());
    }

    [Fact]
    public async Task Dma_AfterUnmapAndRemapWithOtherPermissions_FollowsTheTableOfThatInstant()
    {
        await using var rig = DmaRig.Create(ContainerType.Iommufd);
        var block = rig.Allocate(Page);
        var handle = rig.Open();
        rig.Map(block.Vaddr, 0x10000, Page);
        Assert.True(handle.DmaWrite(0x10000, [7]).Ok);

        rig.Unmap(0x10000, Page);
        Assert.Equal(FaultReason.Unmapped, handle.DmaWrite(0x10000, [8]).Reason);
        rig.Map(block.Vaddr, 0x10000, Page, read: true, write: false);
        Assert.Equal(FaultReason.Permission, handle.DmaWrite(0x10000, [9]).Reason);
        var one = new byte[1];
        Assert.True(handle.DmaRead(0x10000, one).Ok);

        Assert.Equal(7, one[0]);
    }

    /// <summary>
    /// Two sessions map the same IOVA, and (since each session's memory is its own address space)
    /// the same vaddr. Each one's device reaches only its own session's memory.
    /// </summary>
    [Fact]
    public async Task Dma_TwoSessionsSameIovaAndVaddr_EachReachesOnlyItsOwnMemory()
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2);
        var mine = rig.Allocate(Page);
        rig.Map(mine.Vaddr, 0x10000, Page);
        var handle = rig.Open();

        var other = rig.Broker.Sessions.Open("other");
        var theirContainer = rig.Vfio.CreateContainer(other, ContainerType.Iommufd);
        rig.Vfio.BindDevice(other, DmaRig.Edus[1], theirContainer.Id);
        var theirs = other.Allocate(Page);
        other.WriteMemory(theirs.Vaddr, Enumerable.Repeat((byte)0x77, (int)Page).ToArray());
        Assert.Equal(0x10000ul, rig.Vfio.MapDma(other, theirContainer.Id, theirs.Vaddr, 0x10000, Page, true, true));
        var theirHandle = rig.Vfio.OpenDevice(other, DmaRig.Edus[1]);
        DmaRig.SetBusMaster(theirHandle, on: true);
        Assert.Equal(mine.Vaddr, theirs.Vaddr);

        Assert.True(handle.DmaWrite(0x10000, Enumerable.Repeat((byte)0x11, (int)Page).ToArray()).Ok);
        Assert.True(theirHandle.DmaWrite(0x10000, [0x22]).Ok);
        // Unmapped for the first session: it does not fall through to anyone else's mapping.
        Assert.Equal(FaultReason.Unmapped, handle.DmaWrite(0x20000, [0x33]).Reason);

        Assert.Equal([0x11, 0x11], DmaRig.Contents(mine)[..2]);
        Assert.Equal([0x22, 0x77], DmaRig.Contents(theirs)[..2]);
        Assert.All(DmaRig.Contents(theirs)[1..], x => Assert.Equal(0x77, x));
        Assert.All(DmaRig.Contents(mine), x => Assert.Equal(0x11, x));
        Assert.Empty(DmaRig.Drain(other));
    }

    [Fact]
    public async Task Dma_HandleClosed_FailsEbadf()
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2);
        MapLayout(rig);
        var handle = rig.Open();
        rig.Vfio.CloseDevice(rig.Session, handle.Id);

        Assert.Equal(Errno.EBADF, Assert.Throws<ErrnoException>(() => handle.DmaWrite(Rw, [1])).Errno);
        Assert.Equal(Errno.EBADF, Assert.Throws<ErrnoException>(() => handle.DmaRead(Rw, new byte[1])).Errno);
        Assert.Equal(Errno.EBADF, Assert.Throws<ErrnoException>(() => handle.DmaCopy(Rw, Rw + 8, 1)).Errno);
    }

    [Fact]
    public async Task Dma_LongerThanMaxTransfer_FailsEinval()
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2);
        var handle = rig.Open();

        Assert.Equal(Errno.EINVAL, Assert.Throws<ErrnoException>(() => handle.DmaWrite(Rw, new byte[DeviceHandle.MaxTransfer + 1])).Errno);
        Assert.Equal(Errno.EINVAL, Assert.Throws<ErrnoException>(() => handle.DmaCopy(Rw, Rw, -1)).Errno);
    }
}
