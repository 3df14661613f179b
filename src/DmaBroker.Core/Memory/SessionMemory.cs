namespace DmaBroker.Core.Memory;

/// <summary>One block from <see cref="SessionMemory.Allocate"/>: page-aligned, zeroed, pinned while mapped.</summary>
public sealed class MemoryBlock(ulong vaddr, byte[] bytes)
{
    /// <summary>Where the block starts in the session's address space: the address MapDma and Memory calls name.</summary>
    public ulong Vaddr { get; } = vaddr;

    /// <summary>The block's size, the request rounded up to whole pages.</summary>
    public ulong Size { get; } = (ulong)bytes.LongLength;

    /// <summary>The first address past the block; the page there is an unmapped guard.</summary>
    public ulong End => Vaddr + Size;
    internal byte[] Bytes { get; } = bytes;

    /// <summary>How many IOMMU mappings pin this block; guarded by the owning SessionMemory's lock.</summary>
    internal int Pins { get; set; }

    internal bool Freed { get; set; }

    internal Span<byte> Slice(ulong vaddr, int length) => Bytes.AsSpan(checked((int)(vaddr - Vaddr)), length);
}

/// <summary>
/// A session's own memory, standing for the process's address space (SPEC §4): blocks at
/// page-aligned addresses with an unmapped guard page between them, a limit like
/// RLIMIT_MEMLOCK, and pins that keep mapped memory from being freed.
/// </summary>
internal sealed class SessionMemory(ulong limit)
{
    public const ulong PageSize = 4096;
    /// <summary>Where the first block goes; never 0, so a zero vaddr is always a mistake.</summary>
    public const ulong Base = 0x7f00_0000_0000;
    /// <summary>The most one Read or Write may move.</summary>
    public const int MaxTransfer = 4 * 1024 * 1024;

    // Lock 6 of docs/locking.md: a leaf, taken under an IOVA space's lock when a mapping pins or unpins.
    private readonly Lock _sync = new();
    private readonly List<MemoryBlock> _blocks = []; // sorted by Vaddr
    private ulong _next = Base;
    private ulong _used;

    public ulong Limit { get; } = limit;

    public ulong Used
    {
        get
        {
            lock (_sync)
                return _used;
        }
    }

    public int BlockCount
    {
        get
        {
            lock (_sync)
                return _blocks.Count;
        }
    }

    /// <summary>Allocates zeroed memory, rounded up to whole pages.</summary>
    public MemoryBlock Allocate(ulong size)
    {
        if (size == 0)
            throw ErrnoException.Invalid("size must be at least 1 byte");
        if (size > Limit)
            throw ErrnoException.Exhausted(Errno.ENOMEM, $"{size} bytes exceed the session's memory limit of {Limit} bytes");
        // Checked before rounding up too: near 2^64 the rounding wraps around to a tiny size.
        var pages = (size + PageSize - 1) / PageSize * PageSize;
        if (size > int.MaxValue || pages > int.MaxValue - PageSize)
            throw ErrnoException.Exhausted(Errno.ENOMEM, $"{size} bytes is more than one block can hold");
        lock (_sync)
        {
            if (_used + pages > Limit)
                throw ErrnoException.Exhausted(Errno.ENOMEM, $"allocating {pages} bytes would exceed the session's memory limit ({_used} of {Limit} bytes in use)");
            var block = new MemoryBlock(_next, new byte[pages]);
            _next += pages + PageSize; // a guard page: two blocks are never contiguous
            _used += pages;
            _blocks.Add(block);
            return block;
        }
    }

    /// <summary>Frees a whole block; EBUSY while any of it is mapped.</summary>
    public void Free(ulong vaddr)
    {
        lock (_sync)
        {
            var index = IndexOf(vaddr);
            if (index < 0 || _blocks[index].Vaddr != vaddr)
                throw ErrnoException.Invalid($"0x{vaddr:x} is not the start of an allocated block");
            var block = _blocks[index];
            if (block.Pins > 0)
                throw ErrnoException.Busy($"block 0x{vaddr:x} is still mapped by {block.Pins} IOMMU mapping(s); unmap it first");
            block.Freed = true;
            _blocks.RemoveAt(index);
            _used -= block.Size;
        }
    }

    /// <summary>The CPU reads its memory.</summary>
    public void Read(ulong vaddr, Span<byte> destination) => Find(vaddr, (ulong)destination.Length).Slice(vaddr, destination.Length).CopyTo(destination);

    /// <summary>The CPU writes its memory.</summary>
    public void Write(ulong vaddr, ReadOnlySpan<byte> source) => source.CopyTo(Find(vaddr, (ulong)source.Length).Slice(vaddr, source.Length));

    /// <summary>Pins the block that holds all of <c>[vaddr, vaddr+size)</c> for a mapping; EFAULT if none does.</summary>
    internal MemoryBlock Pin(ulong vaddr, ulong size)
    {
        lock (_sync)
        {
            var block = Find(vaddr, size);
            block.Pins++;
            return block;
        }
    }

    internal void Unpin(MemoryBlock block)
    {
        lock (_sync)
            block.Pins--;
    }

    /// <summary>Frees everything (session teardown, after every mapping is gone).</summary>
    internal void Clear()
    {
        lock (_sync)
        {
            foreach (var block in _blocks)
                block.Freed = true;
            _blocks.Clear();
            _used = 0;
        }
    }

    private MemoryBlock Find(ulong vaddr, ulong size)
    {
        lock (_sync)
        {
            var index = IndexOf(vaddr);
            if (index < 0 || size > _blocks[index].End - vaddr)
                throw ErrnoException.Fault($"[0x{vaddr:x}, +0x{size:x}) is not inside the session's allocated memory");
            return _blocks[index];
        }
    }

    // The block containing vaddr, or -1.
    private int IndexOf(ulong vaddr)
    {
        int lo = 0, hi = _blocks.Count - 1;
        while (lo <= hi)
        {
            var mid = (lo + hi) >>> 1;
            var b = _blocks[mid];
            if (vaddr < b.Vaddr)
                hi = mid - 1;
            else if (vaddr >= b.End)
                lo = mid + 1;
            else
                return mid;
        }
        return -1;
    }
}
