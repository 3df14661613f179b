namespace DmaBroker.Core.Memory;

/// <summary>
/// One block from <see cref="SessionMemory.Allocate"/>: page-aligned, zeroed, pinned while mapped.
/// Its bytes are the broker's own array, or, for a shared block (SPEC §15), a range of the
/// session's <see cref="SharedMemoryFile"/> that the client maps too.
/// </summary>
public sealed class MemoryBlock
{
    private readonly byte[]? _bytes;
    private readonly SharedMemoryFile? _shared;

    /// <summary>A block of the broker's own memory at <paramref name="vaddr"/>, as large as <paramref name="bytes"/>.</summary>
    public MemoryBlock(ulong vaddr, byte[] bytes)
    {
        ArgumentNullException.ThrowIfNull(bytes);
        Vaddr = vaddr;
        Size = (ulong)bytes.LongLength;
        _bytes = bytes;
    }

    internal MemoryBlock(ulong vaddr, ulong size, SharedMemoryFile shared, ulong offset)
    {
        Vaddr = vaddr;
        Size = size;
        _shared = shared;
        ShmOffset = offset;
    }

    /// <summary>Where the block starts in the session's address space: the address MapDma and Memory calls name.</summary>
    public ulong Vaddr { get; }

    /// <summary>The block's size, the request rounded up to whole pages.</summary>
    public ulong Size { get; }

    /// <summary>The first address past the block; the page there is an unmapped guard.</summary>
    public ulong End => Vaddr + Size;

    /// <summary>The shared-memory file the block lives in, or null for a block of the broker's own memory.</summary>
    public string? ShmPath => _shared?.Path;

    /// <summary>Where the block starts in <see cref="ShmPath"/> (page-aligned); 0 for a block that is not shared.</summary>
    public ulong ShmOffset { get; }

    internal SharedMemoryFile? Shared => _shared;

    /// <summary>The array behind a block of the broker's own memory (tests look at it directly); a shared block has none.</summary>
    internal byte[] Bytes => _bytes ?? throw new InvalidOperationException($"block 0x{Vaddr:x} is shared memory, with no array behind it");

    /// <summary>How many IOMMU mappings pin this block; guarded by the owning SessionMemory's lock.</summary>
    internal int Pins { get; set; }

    internal bool Freed { get; set; }

    /// <summary>
    /// The bytes at <c>[vaddr, vaddr+length)</c>, which must lie in the block. Allocation-free: the
    /// DMA path takes its spans here. A shared block's span points into the broker's mapping of the
    /// file, which stays in place for as long as the block can be reached (see SharedMemoryFile).
    /// </summary>
    internal Span<byte> Slice(ulong vaddr, int length)
    {
        var offset = vaddr - Vaddr;
        // Checked for both kinds, since a shared block's span is made from a pointer: a wrong range must never reach raw memory.
        if (offset > Size || (ulong)length > Size - offset)
            throw new ArgumentOutOfRangeException(nameof(length), $"[0x{vaddr:x}, +{length}) is not inside block 0x{Vaddr:x}");
        return _bytes is not null ? _bytes.AsSpan((int)offset, length) : _shared!.Span(ShmOffset + offset, length);
    }
}

/// <summary>
/// A session's own memory, standing for the process's address space (SPEC §4): blocks at
/// page-aligned addresses with an unmapped guard page between them, a limit like
/// RLIMIT_MEMLOCK, and pins that keep mapped memory from being freed.
/// </summary>
internal sealed class SessionMemory(ulong limit, ulong sessionId = 0)
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
    private SharedMemoryFile? _shared; // created on the first shared allocation, gone at Clear

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

    /// <summary>The session's shared-memory file, once a shared block was allocated; null before and after teardown.</summary>
    public string? SharedPath
    {
        get
        {
            lock (_sync)
                return _shared?.Path;
        }
    }

    /// <summary>
    /// Allocates zeroed memory, rounded up to whole pages. With <paramref name="shareWithUid"/>,
    /// the block lives in the session's shared-memory file (created on the first such call, owned
    /// by that uid) instead of the broker's own memory; the limit counts both kinds.
    /// </summary>
    public MemoryBlock Allocate(ulong size, uint? shareWithUid = null)
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
            var block = shareWithUid is { } uid ? AllocateShared(pages, uid) : new MemoryBlock(_next, new byte[pages]);
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
            block.Shared?.Release(block.ShmOffset, block.Size);
            block.Freed = true;
            _blocks.RemoveAt(index);
            _used -= block.Size;
        }
    }

    // Under _sync. A file holds twice the limit of address range, so that freeing and allocating
    // blocks of mixed sizes rarely leaves no run large enough; being sparse, that costs nothing.
    private MemoryBlock AllocateShared(ulong pages, uint uid)
    {
        var created = _shared is null;
        var shared = _shared ??= SharedMemoryFile.Create(sessionId, checked(Math.Max(Limit, PageSize) + PageSize - 1) / PageSize * PageSize * 2, uid);
        try
        {
            return new MemoryBlock(_next, pages, shared, shared.Reserve(pages));
        }
        catch when (created)
        {
            // A rejected allocation leaves nothing behind, not even the file it would have made.
            _shared = null;
            shared.Dispose();
            throw;
        }
    }

    // The CPU's copies run outside the lock, as they always have: a Free racing one of the
    // session's own Read or Write calls is its own use-after-free. For a shared block it reads
    // zeros or writes pages that were punched out, and those are punched again before a later
    // block gets them (SharedMemoryFile.Reserve), so no block ever starts with stale bytes.

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

    /// <summary>
    /// Frees everything (session teardown, after every mapping is gone and the session admits no
    /// more calls): the shared file, if any, is unlinked and the broker's mapping of it dropped.
    /// Should a block still be pinned (a teardown step before failed), the file is unlinked but
    /// stays mapped, so a device access that might still hold a span never meets unmapped memory.
    /// </summary>
    internal void Clear()
    {
        lock (_sync)
        {
            var pinned = 0;
            foreach (var block in _blocks)
            {
                block.Freed = true;
                pinned += block.Pins;
            }
            _blocks.Clear();
            _used = 0;
            var shared = _shared;
            _shared = null;
            shared?.Dispose(unmap: pinned == 0);
            if (pinned > 0 && shared is not null)
                throw new InvalidOperationException($"{pinned} pin(s) remain on the session's memory at teardown; {shared.Path} is unlinked but left mapped");
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
