using System.Buffers.Binary;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Memory;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Core.Tests;

/// <summary>
/// SPEC §4's IOMMU mapping rules (MapDma, UnmapDma, GetIommuInfo, Free of mapped memory) for both
/// container flavours, as tables. Every rejected call must leave the mapping table, the memory pins
/// and dma_avail exactly as they were.
/// </summary>
public sealed class IovaMappingTests
{
    private const ulong Page = DmaRig.Page;
    private const ulong Aperture = IovaSpace.ApertureLast + 1;
    private const ulong MsiFirst = IovaSpace.MsiFirst;
    private const ulong MsiEnd = IovaSpace.MsiLast + 1;

    /// <summary>
    /// The memory every MapDma rule runs against: A (288 pages, enough to cover the MSI window), the
    /// guard page, B (4 pages), and a block that was freed. Pages 0-3 of A are already mapped RW at
    /// <see cref="MappedIova"/>, so overlaps have something to hit.
    /// </summary>
    private sealed record Layout(MemoryBlock A, MemoryBlock B, ulong Freed);

    private const ulong MappedIova = 0x10000;
    private const ulong MappedSize = 4 * Page;

    private sealed record MapRule(string Name, Errno Expected, Func<Layout, ulong> Vaddr, ulong? Iova, ulong Size,
        bool Read = true, bool Write = true, ContainerType? Only = null);

    private static readonly MapRule[] MapRules =
    [
        // EINVAL: the request itself
        new("neither READ nor WRITE", Errno.EINVAL, m => m.A.Vaddr, 0x20000, Page, Read: false, Write: false),
        new("size 0", Errno.EINVAL, m => m.A.Vaddr, 0x20000, 0),
        new("iova not page-aligned", Errno.EINVAL, m => m.A.Vaddr, 0x20800, Page),
        new("size not page-aligned", Errno.EINVAL, m => m.A.Vaddr, 0x20000, Page + 0x800),
        new("vaddr not page-aligned", Errno.EINVAL, m => m.A.Vaddr + 0x10, 0x20000, Page),
        new("iova range wraps around", Errno.EINVAL, m => m.A.Vaddr, 0xffff_ffff_ffff_f000, 2 * Page),
        new("vaddr range wraps around", Errno.EINVAL, _ => 0xffff_ffff_ffff_f000, 0x20000, 2 * Page),
        // EINVAL: outside the aperture [0, 2^48) or touching the reserved MSI window
        new("iova at 2^48", Errno.EINVAL, m => m.A.Vaddr, Aperture, Page),
        new("iova straddles 2^48", Errno.EINVAL, m => m.A.Vaddr, Aperture - Page, 2 * Page),
        new("iova far above the aperture", Errno.EINVAL, m => m.A.Vaddr, 1UL << 60, Page),
        new("first page of the MSI window", Errno.EINVAL, m => m.A.Vaddr, MsiFirst, Page),
        new("last page of the MSI window", Errno.EINVAL, m => m.A.Vaddr, MsiEnd - Page, Page),
        new("straddles the MSI window's start", Errno.EINVAL, m => m.A.Vaddr, MsiFirst - Page, 2 * Page),
        new("straddles the MSI window's end", Errno.EINVAL, m => m.A.Vaddr, MsiEnd - Page, 2 * Page),
        new("covers the whole MSI window", Errno.EINVAL, m => m.A.Vaddr, MsiFirst - Page, MsiEnd - MsiFirst + 2 * Page),
        new("no iova on TYPE1V2", Errno.EINVAL, m => m.A.Vaddr, null, Page, Only: ContainerType.Type1v2),
        new("auto iova, neither READ nor WRITE", Errno.EINVAL, m => m.A.Vaddr, null, Page, Read: false, Write: false, Only: ContainerType.Iommufd),
        new("auto iova, size 0", Errno.EINVAL, m => m.A.Vaddr, null, 0, Only: ContainerType.Iommufd),
        new("auto iova, size not page-aligned", Errno.EINVAL, m => m.A.Vaddr, null, 0x800, Only: ContainerType.Iommufd),
        new("auto iova, vaddr not page-aligned", Errno.EINVAL, m => m.A.Vaddr + 8, null, Page, Only: ContainerType.Iommufd),
        // EEXIST: overlaps the mapping at [0x10000, 0x14000)
        new("same range again", Errno.EEXIST, m => m.A.Vaddr + MappedSize, MappedIova, MappedSize),
        new("overlaps its first page", Errno.EEXIST, m => m.A.Vaddr + MappedSize, MappedIova - Page, 2 * Page),
        new("overlaps its last page", Errno.EEXIST, m => m.A.Vaddr + MappedSize, MappedIova + MappedSize - Page, 2 * Page),
        new("inside it", Errno.EEXIST, m => m.A.Vaddr + MappedSize, MappedIova + Page, Page),
        new("covers it", Errno.EEXIST, m => m.A.Vaddr + MappedSize, MappedIova - Page, MappedSize + 2 * Page),
        // EFAULT: vaddr..vaddr+size not inside the session's memory
        new("vaddr never allocated", Errno.EFAULT, _ => 0x1000, 0x20000, Page),
        new("vaddr below the first block", Errno.EFAULT, m => m.A.Vaddr - Page, 0x20000, Page),
        new("vaddr in the guard page after A", Errno.EFAULT, m => m.A.End, 0x20000, Page),
        new("A's last page into the guard page", Errno.EFAULT, m => m.A.End - Page, 0x20000, 2 * Page),
        new("A's last page across the guard page into B", Errno.EFAULT, m => m.A.End - Page, 0x20000, 3 * Page),
        new("runs past B's end", Errno.EFAULT, m => m.B.Vaddr, 0x20000, 5 * Page),
        new("vaddr of a freed block", Errno.EFAULT, m => m.Freed, 0x20000, Page),
        new("auto iova, vaddr never allocated", Errno.EFAULT, _ => 0x1000, null, Page, Only: ContainerType.Iommufd),
        new("auto iova, across the guard page", Errno.EFAULT, m => m.A.End - Page, null, 3 * Page, Only: ContainerType.Iommufd),
    ];

    public static TheoryData<ContainerType, string> MapRejections()
    {
        var data = new TheoryData<ContainerType, string>();
        foreach (var rule in MapRules)
        {
            foreach (var flavour in Flavours)
            {
                if (rule.Only is null || rule.Only == flavour)
                    data.Add(flavour, rule.Name);
            }
        }
        return data;
    }

    /// <summary>SPEC §4: the aperture [0, 2^48) minus the reserved MSI window, inclusive.</summary>
    private static readonly (ulong, ulong)[] UsableRanges = [(0, 0xfedf_ffff), (0xfef0_0000, 0xffff_ffff_ffff)];

    private static readonly ContainerType[] Flavours = [ContainerType.Type1v2, ContainerType.Iommufd];

    [Theory]
    [MemberData(nameof(MapRejections))]
    public async Task MapDma_RejectedRequest_FailsWithItsErrnoAndLeavesTableUnchanged(ContainerType flavour, string rule)
    {
        var r = MapRules.Single(x => x.Name == rule);
        await using var rig = DmaRig.Create(flavour);
        var layout = NewLayout(rig);
        var vaddr = r.Vaddr(layout);

        var e = AssertRejected(rig, r.Expected, () => rig.Map(vaddr, r.Iova, r.Size, r.Read, r.Write), r.Iova, r.Size);

        Assert.Equal(r.Expected, e.Errno);
    }

    [Theory]
    [InlineData(ContainerType.Type1v2)]
    [InlineData(ContainerType.Iommufd)]
    public async Task MapDma_EdgesOfTheUsableRanges_Succeed(ContainerType flavour)
    {
        await using var rig = DmaRig.Create(flavour);
        var a = rig.Allocate(8 * Page);

        // Right below and right above the MSI window, the last page of the aperture, and page 0.
        Assert.Equal(MsiFirst - Page, rig.Map(a.Vaddr, MsiFirst - Page, Page));
        Assert.Equal(MsiEnd, rig.Map(a.Vaddr + Page, MsiEnd, Page));
        Assert.Equal(Aperture - Page, rig.Map(a.Vaddr + 2 * Page, Aperture - Page, Page));
        Assert.Equal(0ul, rig.Map(a.Vaddr + 3 * Page, 0, Page));
        // READ alone and WRITE alone are both valid mappings.
        rig.Map(a.Vaddr, 0x10000, Page, read: true, write: false);
        rig.Map(a.Vaddr, 0x11000, Page, read: false, write: true);

        Assert.Equal(6, rig.Container.Iova.Count);
        Assert.Equal(6, a.Pins);
    }

    // ---- ENOSPC: dma_avail ----

    [Theory]
    [InlineData(ContainerType.Type1v2)]
    [InlineData(ContainerType.Iommufd)]
    public async Task MapDma_MoreThanDmaAvail_FailsEnospcUntilOneIsUnmapped(ContainerType flavour)
    {
        const int limit = 4;
        await using var rig = DmaRig.Create(flavour, sessions: new SessionOptions { DmaLimit = limit });
        var a = rig.Allocate(Page);
        for (var i = 0; i < limit; i++)
            rig.Map(a.Vaddr, 0x10000 + (ulong)i * Page, Page);
        Assert.Equal(0, rig.Vfio.GetIommuInfo(rig.Session, rig.Container.Id).DmaAvailable);

        AssertRejected(rig, Errno.ENOSPC, () => rig.Map(a.Vaddr, 0x20000, Page), 0x20000, Page);
        if (flavour == ContainerType.Iommufd)
            AssertRejected(rig, Errno.ENOSPC, () => rig.Map(a.Vaddr, null, Page));

        Assert.Equal(Page, rig.Unmap(0x10000, Page));
        Assert.Equal(1, rig.Vfio.GetIommuInfo(rig.Session, rig.Container.Id).DmaAvailable);
        Assert.Equal(0x20000ul, rig.Map(a.Vaddr, 0x20000, Page));
    }

    [Theory]
    [InlineData(ContainerType.Type1v2)]
    [InlineData(ContainerType.Iommufd)]
    public async Task MapDma_DefaultLimit_Maps65535AndThe65536thFailsEnospc(ContainerType flavour)
    {
        await using var rig = DmaRig.Create(flavour);
        var a = rig.Allocate(Page);
        Assert.Equal(65535, rig.Vfio.GetIommuInfo(rig.Session, rig.Container.Id).DmaAvailable);

        // The same page may be mapped at many IOVAs, as in Linux; each mapping counts.
        for (ulong i = 0; i < 65535; i++)
            rig.Map(a.Vaddr, 0x1000 + i * Page, Page);

        Assert.Equal(0, rig.Vfio.GetIommuInfo(rig.Session, rig.Container.Id).DmaAvailable);
        var e = AssertRejected(rig, Errno.ENOSPC, () => rig.Map(a.Vaddr, 0x1000 + 65535 * Page, Page), 0x1000 + 65535 * Page, Page);
        Assert.Equal(ErrorKind.ResourceExhausted, e.Kind);
        Assert.Equal(65535 * Page, rig.Vfio.UnmapDma(rig.Session, rig.Container.Id, 0, 0, all: true));
        Assert.Equal(0, a.Pins);
    }

    /// <summary>
    /// Not a timing test: with 65,535 mappings (every other page, each on its own page of memory
    /// modulo 251, permissions cycling RW/R/W) the lookup must still find exactly the right one at
    /// the first, middle and last mapping and at random ones, and nothing in the gaps.
    /// </summary>
    [Theory]
    [InlineData(ContainerType.Type1v2)]
    [InlineData(ContainerType.Iommufd)]
    public async Task Translation_65535Mappings_FindsFirstMiddleLastAndNothingInGaps(ContainerType flavour)
    {
        const int count = 65535;
        const int pages = 251;
        await using var rig = DmaRig.Create(flavour);
        var a = rig.Allocate(pages * Page);
        static ulong IovaOf(int i) => 0x1000 + 2 * (ulong)i * Page;
        for (var i = 0; i < count; i++)
            rig.Map(a.Vaddr + (ulong)(i % pages) * Page, IovaOf(i), Page, read: i % 3 != 2, write: i % 3 != 1);
        var handle = rig.Open();

        const int seed = 65535;
        var rng = new Random(seed);
        int[] probes = [0, 1, 2, 3, count / 2 - 1, count / 2, count / 2 + 1, count - 3, count - 2, count - 1, .. Enumerable.Range(0, 400).Select(_ => rng.Next(count))];
        Span<byte> value = stackalloc byte[8];
        Span<byte> read = stackalloc byte[8];
        foreach (var i in probes)
        {
            var why = $"mapping {i} (seed {seed})";
            var offset = (ulong)(8 * (i % 512));
            var at = (int)((ulong)(i % pages) * Page + offset);
            BinaryPrimitives.WriteInt64LittleEndian(value, i + 1);
            var (readable, writable) = (i % 3 != 2, i % 3 != 1);

            var written = handle.DmaWrite(IovaOf(i) + offset, value);
            Assert.True(written.Ok == writable, $"{why}: write {written}");
            if (writable)
                Assert.True(value.SequenceEqual(a.Bytes.AsSpan(at, 8)), $"{why}: the write did not land on page {i % pages}");
            else
                Assert.Equal((IovaOf(i), FaultReason.Permission), (written.FaultIova, written.Reason));

            var got = handle.DmaRead(IovaOf(i) + offset, read);
            Assert.True(got.Ok == readable, $"{why}: read {got}");
            if (readable)
                Assert.True(read.SequenceEqual(a.Bytes.AsSpan(at, 8)), $"{why}: the read came from elsewhere");

            // The page after every mapping is a gap; a range running into it faults there and writes nothing.
            Assert.Equal((false, IovaOf(i) + Page, FaultReason.Unmapped), Fault(handle.DmaWrite(IovaOf(i) + Page, value)));
            if (writable)
            {
                var before = a.Bytes.AsSpan(at & ~(int)(Page - 1), (int)Page).ToArray();
                Assert.Equal((false, IovaOf(i) + Page, FaultReason.Unmapped), Fault(handle.DmaWrite(IovaOf(i) + Page - 4, value)));
                Assert.True(before.AsSpan().SequenceEqual(a.Bytes.AsSpan(at & ~(int)(Page - 1), (int)Page)), $"{why}: a faulting write changed memory");
            }
        }
        Assert.Equal((false, 0ul, FaultReason.Unmapped), Fault(handle.DmaRead(0, read)));
        Assert.Equal((false, IovaOf(count), FaultReason.Unmapped), Fault(handle.DmaRead(IovaOf(count), read)));

        // Unmapping the middle one leaves its neighbours found.
        Assert.Equal(Page, rig.Unmap(IovaOf(count / 2), Page));
        Assert.Equal((false, IovaOf(count / 2), FaultReason.Unmapped), Fault(handle.DmaRead(IovaOf(count / 2), read)));
        foreach (var i in new[] { count / 2 - 1, count / 2 + 1 })
        {
            Assert.Equal(i % 3 != 2, handle.DmaRead(IovaOf(i), read).Ok);
            Assert.Equal(i % 3 != 1, handle.DmaWrite(IovaOf(i), read).Ok);
        }
    }

    // ---- IOMMUFD picks the IOVA ----

    [Fact]
    public async Task MapDma_IommufdWithoutIova_PicksAlignedFreeNonZeroRangesThatTranslate()
    {
        await using var rig = DmaRig.Create(ContainerType.Iommufd);
        var a = rig.Allocate(16 * Page);
        var handle = rig.Open();
        var taken = new List<(ulong Iova, ulong Size)> { (rig.Map(a.Vaddr, 0x3000, 2 * Page), 2 * Page) };

        ulong[] sizes = [Page, 3 * Page, 2 * Page, Page, 4 * Page];
        var offset = 2 * Page;
        foreach (var size in sizes)
        {
            var iova = rig.Map(a.Vaddr + offset, null, size);
            AssertUsableAndFree(iova, size, taken);
            taken.Add((iova, size));
            // It is really mapped there, onto the memory asked for.
            var marker = BitConverter.GetBytes(iova ^ 0x5a5a_5a5a_5a5a_5a5a);
            Assert.True(handle.DmaWrite(iova + size - 8, marker).Ok);
            Assert.Equal(marker, a.Bytes.AsSpan((int)(offset + size - 8), 8).ToArray());
            offset += size;
        }
    }

    [Fact]
    public async Task MapDma_IommufdWithoutIova_HighestMappingRightBelowMsiWindow_SkipsTheWindow()
    {
        await using var rig = DmaRig.Create(ContainerType.Iommufd);
        var a = rig.Allocate(4 * Page);
        var taken = new List<(ulong Iova, ulong Size)> { (rig.Map(a.Vaddr, MsiFirst - Page, Page), Page) };

        var iova = rig.Map(a.Vaddr, null, 2 * Page);

        AssertUsableAndFree(iova, 2 * Page, taken);
    }

    [Fact]
    public async Task MapDma_IommufdWithoutIova_HighestMappingAtApertureTop_FindsALowGapButNeverZero()
    {
        await using var rig = DmaRig.Create(ContainerType.Iommufd);
        var a = rig.Allocate(4 * Page);
        // Page 0 is free, page 2 is a one-page gap too small for two pages.
        List<(ulong Iova, ulong Size)> taken =
        [
            (rig.Map(a.Vaddr, Aperture - Page, Page), Page),
            (rig.Map(a.Vaddr, Page, Page), Page),
            (rig.Map(a.Vaddr, 3 * Page, Page), Page),
        ];

        var one = rig.Map(a.Vaddr, null, Page);
        AssertUsableAndFree(one, Page, taken);
        taken.Add((one, Page));
        var two = rig.Map(a.Vaddr, null, 2 * Page);
        AssertUsableAndFree(two, 2 * Page, taken);
    }

    private static void AssertUsableAndFree(ulong iova, ulong size, List<(ulong Iova, ulong Size)> taken)
    {
        var last = iova + size - 1;
        Assert.True(iova != 0, "the broker picked IOVA 0");
        Assert.True(iova % Page == 0, $"0x{iova:x} is not page-aligned");
        Assert.True(last > iova && last < Aperture, $"[0x{iova:x}, 0x{last:x}] leaves the aperture");
        Assert.True(last < MsiFirst || iova >= MsiEnd, $"[0x{iova:x}, 0x{last:x}] touches the MSI window");
        foreach (var (other, otherSize) in taken)
            Assert.True(last < other || iova >= other + otherSize, $"[0x{iova:x}, 0x{last:x}] overlaps the mapping at 0x{other:x}");
    }

    // ---- UnmapDma ----

    /// <summary>Three mappings: A at [0x10000, 0x14000), B right after it at [0x14000, 0x16000), C at [0x20000, 0x22000).</summary>
    private static void MapThree(DmaRig rig)
    {
        var m = rig.Allocate(8 * Page);
        rig.Map(m.Vaddr, 0x10000, 4 * Page);
        rig.Map(m.Vaddr + 4 * Page, 0x14000, 2 * Page);
        rig.Map(m.Vaddr + 6 * Page, 0x20000, 2 * Page);
    }

    [Theory]
    // both flavours: the request itself
    [InlineData(ContainerType.Type1v2, 0x10000ul, 0ul, Errno.EINVAL)]
    [InlineData(ContainerType.Iommufd, 0x10000ul, 0ul, Errno.EINVAL)]
    [InlineData(ContainerType.Type1v2, 0x10800ul, 0x1000ul, Errno.EINVAL)]
    [InlineData(ContainerType.Iommufd, 0x10800ul, 0x1000ul, Errno.EINVAL)]
    [InlineData(ContainerType.Type1v2, 0x10000ul, 0x800ul, Errno.EINVAL)]
    [InlineData(ContainerType.Iommufd, 0x10000ul, 0x800ul, Errno.EINVAL)]
    [InlineData(ContainerType.Type1v2, 0xffff_ffff_ffff_f000ul, 0x2000ul, Errno.EINVAL)]
    [InlineData(ContainerType.Iommufd, 0xffff_ffff_ffff_f000ul, 0x2000ul, Errno.EINVAL)]
    // TYPE1V2: a request that bisects a mapping
    [InlineData(ContainerType.Type1v2, 0x11000ul, 0x1000ul, Errno.EINVAL)] // inside A
    [InlineData(ContainerType.Type1v2, 0x10000ul, 0x1000ul, Errno.EINVAL)] // A's first page only
    [InlineData(ContainerType.Type1v2, 0x13000ul, 0x1000ul, Errno.EINVAL)] // A's last page only
    [InlineData(ContainerType.Type1v2, 0xf000ul, 0x2000ul, Errno.EINVAL)] // straddles A's start
    [InlineData(ContainerType.Type1v2, 0x10000ul, 0x5000ul, Errno.EINVAL)] // all of A, half of B
    [InlineData(ContainerType.Type1v2, 0x13000ul, 0x3000ul, Errno.EINVAL)] // end of A, all of B
    [InlineData(ContainerType.Type1v2, 0x15000ul, 0x10000ul, Errno.EINVAL)] // end of B, then all of C
    // IOMMUFD: any partial overlap, and nothing mapped at all
    [InlineData(ContainerType.Iommufd, 0x11000ul, 0x1000ul, Errno.ENOENT)]
    [InlineData(ContainerType.Iommufd, 0x10000ul, 0x1000ul, Errno.ENOENT)]
    [InlineData(ContainerType.Iommufd, 0x13000ul, 0x1000ul, Errno.ENOENT)]
    [InlineData(ContainerType.Iommufd, 0xf000ul, 0x2000ul, Errno.ENOENT)]
    [InlineData(ContainerType.Iommufd, 0x10000ul, 0x5000ul, Errno.ENOENT)]
    [InlineData(ContainerType.Iommufd, 0x13000ul, 0x3000ul, Errno.ENOENT)]
    [InlineData(ContainerType.Iommufd, 0x15000ul, 0x10000ul, Errno.ENOENT)]
    [InlineData(ContainerType.Iommufd, 0x30000ul, 0x1000ul, Errno.ENOENT)]
    [InlineData(ContainerType.Iommufd, 0x16000ul, 0xa000ul, Errno.ENOENT)]
    public async Task UnmapDma_RejectedRequest_FailsWithItsErrnoAndLeavesTableUnchanged(ContainerType flavour, ulong iova, ulong size, Errno expected)
    {
        await using var rig = DmaRig.Create(flavour);
        MapThree(rig);

        AssertRejected(rig, expected, () => rig.Unmap(iova, size));
    }

    [Theory]
    [InlineData(ContainerType.Type1v2, 0x10000ul, 0x4000ul, 0x4000ul, 2)] // exactly A
    [InlineData(ContainerType.Iommufd, 0x10000ul, 0x4000ul, 0x4000ul, 2)]
    [InlineData(ContainerType.Type1v2, 0x10000ul, 0x6000ul, 0x6000ul, 1)] // A and B, adjacent
    [InlineData(ContainerType.Iommufd, 0x10000ul, 0x6000ul, 0x6000ul, 1)]
    [InlineData(ContainerType.Type1v2, 0xf000ul, 0x8000ul, 0x6000ul, 1)] // A and B with free pages around
    [InlineData(ContainerType.Iommufd, 0xf000ul, 0x8000ul, 0x6000ul, 1)]
    [InlineData(ContainerType.Type1v2, 0x0ul, 0x100000ul, 0x8000ul, 0)] // everything, and more
    [InlineData(ContainerType.Iommufd, 0x0ul, 0x100000ul, 0x8000ul, 0)]
    [InlineData(ContainerType.Type1v2, 0x30000ul, 0x1000ul, 0x0ul, 3)] // TYPE1V2: nothing mapped unmaps 0 bytes
    [InlineData(ContainerType.Type1v2, 0x16000ul, 0xa000ul, 0x0ul, 3)] // the gap between B and C
    public async Task UnmapDma_WholeMappings_ReturnsBytesUnmappedAndKeepsTheRest(ContainerType flavour, ulong iova, ulong size, ulong unmapped, int left)
    {
        await using var rig = DmaRig.Create(flavour);
        MapThree(rig);
        var before = MappedPages(rig);

        Assert.Equal(unmapped, rig.Unmap(iova, size));

        Assert.Equal(left, rig.Container.Iova.Count);
        Assert.Equal(65535 - left, rig.Vfio.GetIommuInfo(rig.Session, rig.Container.Id).DmaAvailable);
        var expected = before.Where(p => p < iova || p >= iova + size || unmapped == 0).ToArray();
        Assert.Equal(expected, MappedPages(rig));
    }

    [Theory]
    [InlineData(ContainerType.Type1v2)]
    [InlineData(ContainerType.Iommufd)]
    public async Task UnmapDma_All_UnmapsEverythingReturnsBytesAndUnpins(ContainerType flavour)
    {
        await using var rig = DmaRig.Create(flavour);
        MapThree(rig);
        var block = rig.Allocate(Page);
        rig.Map(block.Vaddr, MsiEnd, Page);

        AssertRejected(rig, Errno.EINVAL, () => rig.Vfio.UnmapDma(rig.Session, rig.Container.Id, 0x10000, 0, all: true));
        AssertRejected(rig, Errno.EINVAL, () => rig.Vfio.UnmapDma(rig.Session, rig.Container.Id, 0, Page, all: true));
        Assert.Equal(0x9000ul, rig.Vfio.UnmapDma(rig.Session, rig.Container.Id, 0, 0, all: true));

        Assert.Equal(0, rig.Container.Iova.Count);
        Assert.Empty(MappedPages(rig));
        Assert.Equal(0ul, rig.Vfio.UnmapDma(rig.Session, rig.Container.Id, 0, 0, all: true));
        rig.Session.Free(block.Vaddr);
    }

    // ---- containers without an IOMMU, GetIommuInfo ----

    [Fact]
    public async Task MapDma_Type1v2ContainerWithoutGroup_FailsEinvalAsDoGetIommuInfoAndUnmap()
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2, claimed: 0);
        var a = rig.Allocate(Page);

        AssertRejected(rig, Errno.EINVAL, () => rig.Map(a.Vaddr, 0x10000, Page));
        AssertRejected(rig, Errno.EINVAL, () => rig.Vfio.GetIommuInfo(rig.Session, rig.Container.Id));
        AssertRejected(rig, Errno.EINVAL, () => rig.Unmap(0x10000, Page));
    }

    [Fact]
    public async Task MapDma_IommufdContainerWithoutDevice_Maps()
    {
        await using var rig = DmaRig.Create(ContainerType.Iommufd, claimed: 0);
        var a = rig.Allocate(Page);

        Assert.Equal(0x10000ul, rig.Map(a.Vaddr, 0x10000, Page));
        Assert.Equal(65534, rig.Vfio.GetIommuInfo(rig.Session, rig.Container.Id).DmaAvailable);
    }

    [Theory]
    [InlineData(ContainerType.Type1v2)]
    [InlineData(ContainerType.Iommufd)]
    public async Task GetIommuInfo_Container_ReportsPageSizeUsableRangesAndDmaAvail(ContainerType flavour)
    {
        await using var rig = DmaRig.Create(flavour);

        var info = rig.Vfio.GetIommuInfo(rig.Session, rig.Container.Id);

        Assert.Equal(4096ul, info.PageSizes);
        Assert.Equal(UsableRanges, info.IovaRanges);
        Assert.Equal(65535, info.DmaAvailable);
        MapThree(rig);
        Assert.Equal(65532, rig.Vfio.GetIommuInfo(rig.Session, rig.Container.Id).DmaAvailable);
    }

    // ---- memory that is mapped stays allocated ----

    [Theory]
    [InlineData(ContainerType.Type1v2)]
    [InlineData(ContainerType.Iommufd)]
    public async Task Free_MappedMemory_FailsEbusyUntilEveryMappingIsGone(ContainerType flavour)
    {
        await using var rig = DmaRig.Create(flavour);
        var a = rig.Allocate(4 * Page);
        rig.Map(a.Vaddr, 0x10000, Page);
        rig.Map(a.Vaddr + 2 * Page, 0x20000, 2 * Page);

        AssertRejected(rig, Errno.EBUSY, () => rig.Session.Free(a.Vaddr));
        rig.Unmap(0x10000, Page);
        AssertRejected(rig, Errno.EBUSY, () => rig.Session.Free(a.Vaddr));
        rig.Unmap(0x20000, 2 * Page);

        rig.Session.Free(a.Vaddr);
        Assert.Equal(0ul, rig.Session.Memory.Used);
    }

    [Fact]
    public async Task UnsetContainer_LastGroupOfType1v2_EmptiesContainerAndUnpinsMemory()
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2, claimed: 2);
        var a = rig.Allocate(2 * Page);
        rig.Map(a.Vaddr, 0x10000, 2 * Page);
        var handle = rig.Open(1);

        rig.Release(0);
        // One group is left: the mapping stays, and the other device still translates through it.
        Assert.Equal(1, rig.Container.Iova.Count);
        Assert.True(handle.DmaWrite(0x10000, [1, 2, 3]).Ok);
        rig.Vfio.CloseDevice(rig.Session, handle.Id);
        rig.Release(1);

        Assert.Equal(0, rig.Container.Iova.Count);
        Assert.Equal(0, a.Pins);
        Assert.False(rig.Container.HasIommu);
        rig.Session.Free(a.Vaddr);
        // Set again, the container starts empty.
        rig.Claim(0);
        Assert.Equal(65535, rig.Vfio.GetIommuInfo(rig.Session, rig.Container.Id).DmaAvailable);
    }

    [Fact]
    public async Task UnbindDevice_LastDeviceOfIommufd_KeepsTheMappings()
    {
        await using var rig = DmaRig.Create(ContainerType.Iommufd);
        var a = rig.Allocate(Page);
        rig.Map(a.Vaddr, 0x10000, Page);

        rig.Release(0);

        // An IOAS lives on without devices, as in Linux.
        Assert.Equal(1, rig.Container.Iova.Count);
        AssertRejected(rig, Errno.EBUSY, () => rig.Session.Free(a.Vaddr));
    }

    [Fact]
    public async Task DestroyContainer_IommufdWithMappings_UnmapsThemSoTheMemoryCanBeFreed()
    {
        await using var rig = DmaRig.Create(ContainerType.Iommufd, claimed: 0);
        var a = rig.Allocate(2 * Page);
        rig.Map(a.Vaddr, 0x10000, Page);
        rig.Map(a.Vaddr + Page, null, Page);

        rig.Vfio.DestroyContainer(rig.Session, rig.Container.Id);

        // As closing the container fd (or destroying the IOAS) does in Linux: the mappings go with it.
        Assert.Equal(0, rig.Container.Iova.Count);
        Assert.Equal(0, a.Pins);
        Assert.Equal(Errno.ENOENT, Assert.Throws<ErrnoException>(() => rig.Map(a.Vaddr, 0x20000, Page)).Errno);
        rig.Session.Free(a.Vaddr);
    }

    // ---- helpers ----

    private static Layout NewLayout(DmaRig rig)
    {
        var a = rig.Allocate(288 * Page);
        var b = rig.Allocate(4 * Page);
        var freed = rig.Allocate(Page);
        rig.Session.Free(freed.Vaddr);
        Assert.Equal(MappedIova, rig.Map(a.Vaddr, MappedIova, MappedSize));
        return new Layout(a, b, freed.Vaddr);
    }

    /// <summary>Asserts the call fails with <paramref name="errno"/> and changes neither the mapping table nor dma_avail nor the pins.</summary>
    private static ErrnoException AssertRejected(DmaRig rig, Errno errno, Action call, ulong? iova = null, ulong size = 0)
    {
        ulong[] probes = iova is { } i && size > 0 && i + size - 1 >= i ? [i, i + size - 1] : [];
        var before = rig.Table(probes);
        var e = Assert.Throws<ErrnoException>(call);
        Assert.Equal(errno, e.Errno);
        Assert.Equal(before, rig.Table(probes));
        return e;
    }

    /// <summary>Every page in [0, 0x40000) that a device could read.</summary>
    private static ulong[] MappedPages(DmaRig rig)
    {
        var space = rig.Container.Iova;
        return [.. Enumerable.Range(0, 0x40).Select(p => (ulong)p * Page).Where(p => space.Check(p, Page, DmaAccess.Read).Ok)];
    }

    private static (bool Ok, ulong Iova, FaultReason Reason) Fault(DmaOutcome outcome) => (outcome.Ok, outcome.FaultIova, outcome.Reason);
}
