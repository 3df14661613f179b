using DmaBroker.Core.Memory;

namespace DmaBroker.Core.Iommu;

/// <summary>One IOVA range of a container, mapped onto session memory with device-side permissions.</summary>
internal sealed class IovaMapping(ulong iova, ulong size, MemoryBlock block, ulong vaddr, bool read, bool write)
{
    public ulong Iova { get; } = iova;
    public ulong Size { get; } = size;
    /// <summary>The last IOVA of the mapping (inclusive), so the top of the aperture never overflows.</summary>
    public ulong Last => Iova + Size - 1;
    public ulong Vaddr { get; } = vaddr;
    public bool Read { get; } = read;
    public bool Write { get; } = write;
    internal MemoryBlock Block { get; } = block;

    internal bool Allows(DmaAccess access) => access == DmaAccess.Write ? Write : Read;

    // The bytes behind [iova, iova + length); the caller has checked the range lies inside.
    internal Span<byte> Bytes(ulong iova, int length) => Block.Slice(Vaddr + (iova - Iova), length);
}

/// <summary>What a device access came to: done, or a fault at the first page that failed.</summary>
/// <param name="Ok">The access went through.</param>
/// <param name="FaultIova">The page-aligned IOVA of the first page that failed.</param>
/// <param name="Access">The direction that faulted.</param>
/// <param name="Reason">Why it faulted.</param>
public readonly record struct DmaOutcome(bool Ok, ulong FaultIova, DmaAccess Access, FaultReason Reason)
{
    /// <summary>The access went through: every page was mapped with the permission it needed.</summary>
    public static readonly DmaOutcome Success = new(true, 0, default, default);

    /// <summary>The access faulted at the page <paramref name="iova"/>, and nothing was written.</summary>
    public static DmaOutcome Faulted(ulong iova, DmaAccess access, FaultReason reason) => new(false, iova, access, reason);
}

/// <summary>Which Linux interface's unmap rules apply.</summary>
internal enum UnmapRules
{
    /// <summary>VFIO type1v2: bisecting a mapping is EINVAL; nothing mapped unmaps 0 bytes.</summary>
    Type1v2,
    /// <summary>iommufd: a partial overlap, or nothing mapped, is ENOENT.</summary>
    Iommufd,
}

/// <summary>
/// An IOMMU address space: mappings sorted by IOVA (binary search, so lookups stay logarithmic
/// at 65,535 mappings), the aperture and the reserved MSI window. Device accesses run under the
/// read side of a reader-writer lock and changes under the write side, so when an unmap (or a
/// domain detach) returns, no device access that could see the old mapping is still running.
/// </summary>
internal sealed class IovaSpace(int dmaLimit) : IDisposable
{
    public const ulong PageSize = 4096;
    public const ulong PageMask = PageSize - 1;
    /// <summary>The IOVA aperture is [0, 2^48).</summary>
    public const ulong ApertureLast = (1UL << 48) - 1;
    public const ulong MsiFirst = 0xfee0_0000;
    public const ulong MsiLast = 0xfeef_ffff;

    // Lock 5 of docs/locking.md: shared by device accesses, exclusive for changes and detaches;
    // taken after the group, container and device locks, before session memory's.
    private readonly ReaderWriterLockSlim _lock = new(LockRecursionPolicy.NoRecursion);
    private IovaMapping[] _mappings = new IovaMapping[16];
    private int _count;

    public int DmaLimit { get; } = dmaLimit;

    public int Count
    {
        get
        {
            _lock.EnterReadLock();
            try
            {
                return _count;
            }
            finally
            {
                _lock.ExitReadLock();
            }
        }
    }

    /// <summary>The usable IOVA ranges (inclusive): the aperture minus the reserved window.</summary>
    public static IReadOnlyList<(ulong First, ulong Last)> UsableRanges { get; } = [(0, MsiFirst - 1), (MsiLast + 1, ApertureLast)];

    /// <summary>
    /// Maps <c>[vaddr, vaddr+size)</c> of session memory at <paramref name="iova"/> (or at a free
    /// IOVA the space picks when null). Checks in Linux type1's order: arguments (EINVAL), overlap
    /// (EEXIST), mapping count (ENOSPC), aperture and reserved window (EINVAL), memory (EFAULT).
    /// </summary>
    public ulong Map(SessionMemory memory, ulong vaddr, ulong? iova, ulong size, bool read, bool write)
    {
        if (!read && !write)
            throw ErrnoException.Invalid("a mapping needs READ, WRITE or both");
        if (size == 0)
            throw ErrnoException.Invalid("size must not be 0");
        if ((((iova ?? 0) | size | vaddr) & PageMask) != 0)
            throw ErrnoException.Invalid($"iova, size and vaddr must be multiples of the {PageSize}-byte page size");
        if (vaddr + size - 1 < vaddr || (iova is { } fixedIova && fixedIova + size - 1 < fixedIova))
            throw ErrnoException.Invalid("the range wraps around the end of the address space");

        _lock.EnterWriteLock();
        try
        {
            ulong at;
            if (iova is { } requested)
            {
                if (FindFirstOverlap(requested, requested + size - 1) >= 0)
                    throw ErrnoException.Exists($"[0x{requested:x}, 0x{requested + size - 1:x}] overlaps an existing mapping");
                CheckRoom();
                if (!IsUsable(requested, requested + size - 1))
                    throw ErrnoException.Invalid($"[0x{requested:x}, 0x{requested + size - 1:x}] is outside the aperture [0, 2^48) or inside the reserved MSI window [0x{MsiFirst:x}, 0x{MsiLast:x}]");
                at = requested;
            }
            else
            {
                CheckRoom();
                at = PickFree(size) ?? throw ErrnoException.Exhausted(Errno.ENOSPC, $"no free IOVA range of 0x{size:x} bytes");
            }
            var block = memory.Pin(vaddr, size);
            Insert(new IovaMapping(at, size, block, vaddr, read, write));
            return at;
        }
        finally
        {
            _lock.ExitWriteLock();
        }
    }

    /// <summary>
    /// Unmaps and returns the bytes unmapped. Returns only once every device access that could
    /// use the range has finished.
    /// </summary>
    public ulong Unmap(SessionMemory memory, ulong iova, ulong size, bool all, UnmapRules rules)
    {
        if (all)
        {
            if (iova != 0 || size != 0)
                throw ErrnoException.Invalid("with 'all', iova and size must be 0");
            return Clear(memory);
        }
        if (size == 0)
            throw ErrnoException.Invalid("size must not be 0");
        if (((iova | size) & PageMask) != 0)
            throw ErrnoException.Invalid($"iova and size must be multiples of the {PageSize}-byte page size");
        var last = iova + size - 1;
        if (last < iova)
            throw ErrnoException.Invalid("the range wraps around the end of the address space");

        _lock.EnterWriteLock();
        try
        {
            var first = FindFirstOverlap(iova, last);
            if (first < 0)
                return rules == UnmapRules.Iommufd ? throw ErrnoException.NotFound(Errno.ENOENT, $"nothing is mapped in [0x{iova:x}, 0x{last:x}]") : 0UL;
            var end = first;
            while (end < _count && _mappings[end].Iova <= last)
                end++;
            var head = _mappings[first];
            var tail = _mappings[end - 1];
            if (head.Iova < iova || tail.Last > last)
            {
                var bisected = head.Iova < iova ? head : tail;
                throw rules == UnmapRules.Iommufd
                    ? ErrnoException.NotFound(Errno.ENOENT, $"[0x{iova:x}, 0x{last:x}] only partly covers the mapping [0x{bisected.Iova:x}, 0x{bisected.Last:x}]")
                    : ErrnoException.Invalid($"[0x{iova:x}, 0x{last:x}] would bisect the mapping [0x{bisected.Iova:x}, 0x{bisected.Last:x}]");
            }
            ulong unmapped = 0;
            for (var i = first; i < end; i++)
            {
                unmapped += _mappings[i].Size;
                memory.Unpin(_mappings[i].Block);
            }
            RemoveRange(first, end - first);
            return unmapped;
        }
        finally
        {
            _lock.ExitWriteLock();
        }
    }

    /// <summary>Removes every mapping (unmap all, container emptied or destroyed).</summary>
    public ulong Clear(SessionMemory memory)
    {
        _lock.EnterWriteLock();
        try
        {
            ulong unmapped = 0;
            for (var i = 0; i < _count; i++)
            {
                unmapped += _mappings[i].Size;
                memory.Unpin(_mappings[i].Block);
            }
            RemoveRange(0, _count);
            return unmapped;
        }
        finally
        {
            _lock.ExitWriteLock();
        }
    }

    /// <summary>How many more mappings fit.</summary>
    public int Available => DmaLimit - Count;

    // ---- the device side: call between EnterAccess and ExitAccess ----

    /// <summary>Holds off unmaps and detaches while a device access runs.</summary>
    internal void EnterAccess() => _lock.EnterReadLock();

    internal void ExitAccess() => _lock.ExitReadLock();

    /// <summary>Write blocks (X) out, exclusively; call around anything that changes what devices may reach.</summary>
    internal void EnterExclusive() => _lock.EnterWriteLock();

    internal void ExitExclusive() => _lock.ExitWriteLock();

    /// <summary>The device writes <paramref name="data"/> at <paramref name="iova"/>: every page is checked before any byte lands.</summary>
    internal DmaOutcome DeviceWrite(ulong iova, ReadOnlySpan<byte> data)
    {
        var check = Check(iova, (ulong)data.Length, DmaAccess.Write);
        if (!check.Ok)
            return check;
        var at = iova;
        while (!data.IsEmpty)
        {
            var m = _mappings[FindContaining(at)];
            var n = (int)Math.Min((ulong)data.Length, m.Last - at + 1);
            data[..n].CopyTo(m.Bytes(at, n));
            data = data[n..];
            at += (ulong)n;
        }
        return DmaOutcome.Success;
    }

    /// <summary>The device reads host memory at <paramref name="iova"/> into <paramref name="destination"/>.</summary>
    internal DmaOutcome DeviceRead(ulong iova, Span<byte> destination)
    {
        var check = Check(iova, (ulong)destination.Length, DmaAccess.Read);
        if (!check.Ok)
            return check;
        var at = iova;
        while (!destination.IsEmpty)
        {
            var m = _mappings[FindContaining(at)];
            var n = (int)Math.Min((ulong)destination.Length, m.Last - at + 1);
            m.Bytes(at, n).CopyTo(destination);
            destination = destination[n..];
            at += (ulong)n;
        }
        return DmaOutcome.Success;
    }

    /// <summary>Checks every page of the range, in order; the first that fails is the fault.</summary>
    internal DmaOutcome Check(ulong iova, ulong length, DmaAccess access)
    {
        if (length == 0)
            return DmaOutcome.Success;
        var last = iova + length - 1;
        // A range that wraps starts above the aperture, so its first page is unmapped. One that runs
        // past the aperture needs no special case: nothing is mapped there, so the walk faults at the
        // first page that is not mapped, which may come before the aperture's end.
        if (last < iova)
            return DmaOutcome.Faulted(iova & ~PageMask, access, FaultReason.Unmapped);
        var at = iova;
        while (true)
        {
            var index = FindContaining(at);
            if (index < 0)
                return DmaOutcome.Faulted(at & ~PageMask, access, FaultReason.Unmapped);
            var m = _mappings[index];
            if (!m.Allows(access))
                return DmaOutcome.Faulted(at & ~PageMask, access, FaultReason.Permission);
            if (m.Last >= last)
                return DmaOutcome.Success;
            at = m.Last + 1;
        }
    }

    public void Dispose() => _lock.Dispose();

    // ---- the sorted table (under the lock) ----

    private void CheckRoom()
    {
        if (_count >= DmaLimit)
            throw ErrnoException.Exhausted(Errno.ENOSPC, $"the container already has {_count} mappings, its dma_avail limit");
    }

    private static bool IsUsable(ulong first, ulong last) =>
        last <= ApertureLast && (last < MsiFirst || first > MsiLast);

    // The index of the mapping containing iova, or -1.
    private int FindContaining(ulong iova)
    {
        int lo = 0, hi = _count - 1;
        while (lo <= hi)
        {
            var mid = (lo + hi) >>> 1;
            var m = _mappings[mid];
            if (iova < m.Iova)
                hi = mid - 1;
            else if (iova > m.Last)
                lo = mid + 1;
            else
                return mid;
        }
        return -1;
    }

    // The index of the first mapping overlapping [first, last], or -1.
    private int FindFirstOverlap(ulong first, ulong last)
    {
        // The first mapping whose Last >= first.
        int lo = 0, hi = _count;
        while (lo < hi)
        {
            var mid = (lo + hi) >>> 1;
            if (_mappings[mid].Last < first)
                lo = mid + 1;
            else
                hi = mid;
        }
        return lo < _count && _mappings[lo].Iova <= last ? lo : -1;
    }

    // Lowest-address-first search would be O(n) per map; try above the highest mapping first.
    private ulong? PickFree(ulong size)
    {
        var candidate = _count == 0 ? PageSize : _mappings[_count - 1].Last + 1;
        if (Fits(ref candidate, size))
            return candidate;
        candidate = PageSize;
        for (var i = 0; i <= _count; i++)
        {
            var limit = i < _count ? _mappings[i].Iova : ApertureLast + 1;
            if (Fits(ref candidate, size) && candidate + size <= limit)
                return candidate;
            if (i < _count)
                candidate = Math.Max(candidate, _mappings[i].Last + 1);
        }
        return null;
    }

    // Moves a candidate past the reserved window if it would touch it; false if it leaves the aperture.
    private static bool Fits(ref ulong candidate, ulong size)
    {
        if (candidate <= MsiLast && candidate + size - 1 >= MsiFirst)
            candidate = MsiLast + 1;
        return candidate + size - 1 >= candidate && candidate + size - 1 <= ApertureLast;
    }

    private void Insert(IovaMapping mapping)
    {
        int lo = 0, hi = _count;
        while (lo < hi)
        {
            var mid = (lo + hi) >>> 1;
            if (_mappings[mid].Iova < mapping.Iova)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (_count == _mappings.Length)
            Array.Resize(ref _mappings, _mappings.Length * 2);
        Array.Copy(_mappings, lo, _mappings, lo + 1, _count - lo);
        _mappings[lo] = mapping;
        _count++;
    }

    private void RemoveRange(int index, int count)
    {
        Array.Copy(_mappings, index + count, _mappings, index, _count - index - count);
        Array.Clear(_mappings, _count - count, count);
        _count -= count;
    }
}
