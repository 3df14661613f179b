using DmaBroker.Core.Memory;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Core.Tests;

/// <summary>SPEC §4's session memory (the Memory service): Allocate, Free, Read, Write and the per-session limit.</summary>
public sealed class SessionMemoryTests : IAsyncLifetime, IAsyncDisposable
{
    private const ulong Page = SessionMemory.PageSize;
    private const ulong Limit = 16 * Page;

    private readonly Broker _broker = new(TopologyDocument.Default(),
        new BrokerOptions { Sessions = new SessionOptions { MemoryLimit = Limit } }, new FakeTimeProvider());
    private readonly Session _session;

    public SessionMemoryTests() => _session = _broker.Sessions.Open("memory");

    public Task InitializeAsync() => Task.CompletedTask;

    Task IAsyncLifetime.DisposeAsync() => DisposeAsync().AsTask();

    public ValueTask DisposeAsync() => _broker.DisposeAsync();

    [Theory]
    [InlineData(1ul, Page)]
    [InlineData(4095ul, Page)]
    [InlineData(4096ul, Page)]
    [InlineData(4097ul, 2 * Page)]
    [InlineData(3 * Page + 1, 4 * Page)]
    [InlineData(Limit, Limit)]
    public void Allocate_Size_ReturnsNonZeroPageAlignedZeroedBlockRoundedUpToPages(ulong size, ulong rounded)
    {
        // Something first, so the block under test is not the first one.
        var earlier = _session.Allocate(1);
        _session.WriteMemory(earlier.Vaddr, [0xff]);
        _session.Free(earlier.Vaddr);

        var block = _session.Allocate(size);

        Assert.NotEqual(0ul, block.Vaddr);
        Assert.Equal(0ul, block.Vaddr % Page);
        Assert.Equal(rounded, block.Size);
        Assert.Equal(rounded, _session.Memory.Used);
        var contents = new byte[rounded];
        _session.ReadMemory(block.Vaddr, contents);
        Assert.All(contents, b => Assert.Equal(0, b));
    }

    [Fact]
    public void Allocate_TwoBlocks_AreSeparatedByAGuardPage()
    {
        var a = _session.Allocate(Page);
        var b = _session.Allocate(Page);

        Assert.True(b.Vaddr >= a.End + Page || a.Vaddr >= b.End + Page, $"0x{a.Vaddr:x} and 0x{b.Vaddr:x} are contiguous");
        AssertFault(() => _session.ReadMemory(a.End, new byte[1]));
        AssertFault(() => _session.ReadMemory(a.End - 1, new byte[2]));
    }

    [Fact]
    public void Allocate_ZeroBytes_FailsEinval()
    {
        var e = Assert.Throws<ErrnoException>(() => _session.Allocate(0));
        Assert.Equal(Errno.EINVAL, e.Errno);
        Assert.Equal(0ul, _session.Memory.Used);
    }

    [Theory]
    [InlineData(Limit + 1)] // larger than the limit
    [InlineData(Limit + Page)]
    [InlineData(ulong.MaxValue)]
    public void Allocate_MoreThanTheLimit_FailsEnomem(ulong size)
    {
        var e = Assert.Throws<ErrnoException>(() => _session.Allocate(size));

        Assert.Equal((Errno.ENOMEM, ErrorKind.ResourceExhausted), (e.Errno, e.Kind));
        Assert.Equal((0ul, 0), (_session.Memory.Used, _session.Memory.BlockCount));
    }

    /// <summary>With no practical limit, a size whose rounding up to pages overflows must still be refused, not turned into a tiny block.</summary>
    [Theory]
    [InlineData(ulong.MaxValue)]
    [InlineData(ulong.MaxValue - Page + 2)]
    [InlineData(1ul << 40)]
    public async Task Allocate_HugeSizeWithUnlimitedMemory_FailsEnomem(ulong size)
    {
        await using var broker = new Broker(TopologyDocument.Default(),
            new BrokerOptions { Sessions = new SessionOptions { MemoryLimit = ulong.MaxValue } }, new FakeTimeProvider());
        var session = broker.Sessions.Open("unlimited");

        var e = Assert.Throws<ErrnoException>(() => session.Allocate(size));

        Assert.Equal(Errno.ENOMEM, e.Errno);
        Assert.Equal((0ul, 0), (session.Memory.Used, session.Memory.BlockCount));
    }

    [Fact]
    public void Allocate_PastTheLimitInSteps_FailsEnomemCountingRoundedSizesUntilSomethingIsFreed()
    {
        var first = _session.Allocate(10 * Page);
        _session.Allocate(4 * Page + 1); // counts as 5 pages: 15 of 16 used

        Assert.Equal(Errno.ENOMEM, Assert.Throws<ErrnoException>(() => _session.Allocate(Page + 1)).Errno);
        Assert.Equal(15 * Page, _session.Memory.Used);
        _session.Allocate(1);
        Assert.Equal(Errno.ENOMEM, Assert.Throws<ErrnoException>(() => _session.Allocate(1)).Errno);

        _session.Free(first.Vaddr);
        _session.Allocate(10 * Page);
        Assert.Equal(Limit, _session.Memory.Used);
    }

    [Fact]
    public async Task Allocate_LimitIsPerSession_OtherSessionsAllocateTheirOwn()
    {
        _session.Allocate(Limit);
        var other = _broker.Sessions.Open("other");

        var block = other.Allocate(Limit);

        Assert.Equal(Limit, block.Size);
        await _broker.Sessions.EndAsync(other, SessionEndReason.ClientClosed).WaitAsync(CoreState.Timeout);
    }

    [Theory]
    [InlineData(1ul)] // inside the first page
    [InlineData(Page)] // the second page of the block
    [InlineData(2 * Page - 1)]
    public void Free_NotTheStartOfABlock_FailsEinvalAndKeepsTheBlock(ulong offset)
    {
        var block = _session.Allocate(2 * Page);
        _session.WriteMemory(block.Vaddr, [1, 2, 3]);

        var e = Assert.Throws<ErrnoException>(() => _session.Free(block.Vaddr + offset));

        Assert.Equal(Errno.EINVAL, e.Errno);
        Assert.Equal(2 * Page, _session.Memory.Used);
        var data = new byte[3];
        _session.ReadMemory(block.Vaddr, data);
        Assert.Equal([1, 2, 3], data);
    }

    [Fact]
    public void Free_NeverAllocatedOrAlreadyFreed_FailsEinval()
    {
        var block = _session.Allocate(Page);
        _session.Free(block.Vaddr);

        Assert.Equal(Errno.EINVAL, Assert.Throws<ErrnoException>(() => _session.Free(block.Vaddr)).Errno);
        Assert.Equal(Errno.EINVAL, Assert.Throws<ErrnoException>(() => _session.Free(0)).Errno);
        Assert.Equal(Errno.EINVAL, Assert.Throws<ErrnoException>(() => _session.Free(block.End)).Errno);
        AssertFault(() => _session.ReadMemory(block.Vaddr, new byte[1]));
    }

    [Fact]
    public void Free_OneBlock_LeavesTheOthersIntact()
    {
        var a = _session.Allocate(Page);
        var b = _session.Allocate(Page);
        var c = _session.Allocate(Page);
        _session.WriteMemory(a.Vaddr, [0xa]);
        _session.WriteMemory(c.Vaddr + Page - 1, [0xc]);

        _session.Free(b.Vaddr);

        var one = new byte[1];
        _session.ReadMemory(a.Vaddr, one);
        Assert.Equal(0xa, one[0]);
        _session.ReadMemory(c.Vaddr + Page - 1, one);
        Assert.Equal(0xc, one[0]);
        AssertFault(() => _session.ReadMemory(b.Vaddr, one));
    }

    [Fact]
    public void WriteThenRead_AnywhereInABlock_RoundTrips()
    {
        var block = _session.Allocate(3 * Page);
        var data = Enumerable.Range(0, 5000).Select(i => (byte)(i * 7)).ToArray();

        _session.WriteMemory(block.Vaddr + 100, data);

        var back = new byte[data.Length];
        _session.ReadMemory(block.Vaddr + 100, back);
        Assert.Equal(data, back);
        var head = new byte[100];
        _session.ReadMemory(block.Vaddr, head);
        Assert.All(head, b => Assert.Equal(0, b));
    }

    /// <summary>Offsets and lengths relative to block A (2 pages), followed by a guard page and block B.</summary>
    [Theory]
    [InlineData(-1L, 1)] // the byte before A
    [InlineData(-1L, 2)] // straddles A's start
    [InlineData(2 * (long)Page, 1)] // the guard page
    [InlineData(2 * (long)Page - 1, 2)] // straddles A's end
    [InlineData(0L, 2 * (int)Page + 1)] // longer than A
    [InlineData(2 * (long)Page - 1, (int)Page + 2)] // from A across the guard page into B
    [InlineData(-(long)SessionMemory.Base, 1)] // address 0 (A is the session's first block)
    public void ReadOrWrite_OutsideAllocatedMemory_FailsEfaultAndChangesNothing(long offset, int length)
    {
        var a = _session.Allocate(2 * Page);
        var b = _session.Allocate(Page);
        Assert.Equal(a.End + Page, b.Vaddr);
        var vaddr = (ulong)((long)a.Vaddr + offset);
        var junk = Enumerable.Repeat((byte)0xee, length).ToArray();

        AssertFault(() => _session.ReadMemory(vaddr, new byte[length]));
        AssertFault(() => _session.WriteMemory(vaddr, junk));

        var all = new byte[a.Size];
        _session.ReadMemory(a.Vaddr, all);
        Assert.All(all, x => Assert.Equal(0, x));
        _session.ReadMemory(b.Vaddr, all.AsSpan(0, (int)Page));
        Assert.All(all, x => Assert.Equal(0, x));
    }

    [Fact]
    public void ReadMemory_MoreThanMaxTransfer_FailsEinval()
    {
        var e = Assert.Throws<ErrnoException>(() => _session.ReadMemory(SessionMemory.Base, new byte[SessionMemory.MaxTransfer + 1]));
        Assert.Equal(Errno.EINVAL, e.Errno);
    }

    [Fact]
    public async Task MemoryCalls_AfterTheSessionEnded_FailUnauthenticated()
    {
        var block = _session.Allocate(Page);
        await _broker.Sessions.EndAsync(_session, SessionEndReason.ClientClosed).WaitAsync(CoreState.Timeout);

        Action[] calls =
        [
            () => _session.Allocate(Page),
            () => _session.Free(block.Vaddr),
            () => _session.ReadMemory(block.Vaddr, new byte[1]),
            () => _session.WriteMemory(block.Vaddr, [1]),
        ];
        foreach (var call in calls)
            Assert.Equal(ErrorKind.Unauthenticated, Assert.Throws<ErrnoException>(call).Kind);
        // Teardown freed everything the session had.
        Assert.Equal((0ul, 0), (_session.Memory.Used, _session.Memory.BlockCount));
    }

    private static void AssertFault(Action call) => Assert.Equal(Errno.EFAULT, Assert.Throws<ErrnoException>(call).Errno);
}
