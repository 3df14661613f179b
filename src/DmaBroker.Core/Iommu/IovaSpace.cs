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

    // The device accesses in flight through the mapping (the low bits) and, once it has been taken
    // out of its space's table, the Removed bit: one word, so entering and removing are each one
    // atomic step and either an access sees Removed or the remover sees the access (docs/locking.md).
    private const int RemovedBit = 1 << 30;
    private int _state;
    // Set by the remover before it sets Removed, so whoever lets the count fall to zero finds it.
    private object? _drainSync;

    /// <summary>Counts an access in; false, counting nothing, if the mapping was removed meanwhile.</summary>
    internal bool TryEnter()
    {
        if ((Interlocked.Increment(ref _state) & RemovedBit) == 0)
            return true;
        Exit();
        return false;
    }

    /// <summary>Counts an access out; the last one out of a removed mapping wakes its remover.</summary>
    internal void Exit()
    {
        if (Interlocked.Decrement(ref _state) != RemovedBit)
            return;
        var sync = Volatile.Read(ref _drainSync)!;
        lock (sync)
            Monitor.PulseAll(sync);
    }

    /// <summary>
    /// Marks the mapping removed (after its space published a table without it): no access enters
    /// it from now on. Call <see cref="WaitDrained"/> next.
    /// </summary>
    internal void MarkRemoved()
    {
        Volatile.Write(ref _drainSync, new object());
        Interlocked.Or(ref _state, RemovedBit);
    }

    /// <summary>Returns once no access that entered before <see cref="MarkRemoved"/> is still in the mapping.</summary>
    internal void WaitDrained()
    {
        // Accesses are memory copies of at most 4 MiB: spin a little before sleeping.
        var spin = new SpinWait();
        while (Volatile.Read(ref _state) != RemovedBit)
        {
            if (spin.NextSpinWillYield)
            {
                var sync = Volatile.Read(ref _drainSync)!;
                lock (sync)
                {
                    while (Volatile.Read(ref _state) != RemovedBit)
                        Monitor.Wait(sync);
                }
                return;
            }
            spin.SpinOnce();
        }
    }
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
/// at 65,535 mappings), the aperture and the reserved MSI window. The mappings are an immutable
/// table, replaced whole by every change (copy on write) under the change lock; a device access
/// takes no lock: it reads the current table, counts itself into the mappings it translates
/// through and copies. An unmap publishes a table without the range, marks its mappings removed
/// and waits only for the accesses already counted into them, so when it returns no device access
/// that translated through the range is still running and none can start (docs/locking.md).
/// </summary>
internal sealed class IovaSpace(int dmaLimit)
{
    public const ulong PageSize = 4096;
    public const ulong PageMask = PageSize - 1;
    /// <summary>The IOVA aperture is [0, 2^48).</summary>
    public const ulong ApertureLast = (1UL << 48) - 1;
    public const ulong MsiFirst = 0xfee0_0000;
    public const ulong MsiLast = 0xfeef_ffff;

    // Lock 5 of docs/locking.md: serialises map, unmap and clear (a change and its drain); taken
    // after the group, container and device locks, before session memory's. Device accesses never take it.
    private readonly Lock _changes = new();
    // The current table, read without a lock; replaced (never changed in place) under _changes.
    private Table _table = Table.Empty;

    public int DmaLimit { get; } = dmaLimit;

    public int Count => Volatile.Read(ref _table).Count;

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

        lock (_changes)
        {
            var table = _table;
            ulong at;
            if (iova is { } requested)
            {
                if (table.FindFirstOverlap(requested, requested + size - 1) >= 0)
                    throw ErrnoException.Exists($"[0x{requested:x}, 0x{requested + size - 1:x}] overlaps an existing mapping");
                CheckRoom(table);
                if (!IsUsable(requested, requested + size - 1))
                    throw ErrnoException.Invalid($"[0x{requested:x}, 0x{requested + size - 1:x}] is outside the aperture [0, 2^48) or inside the reserved MSI window [0x{MsiFirst:x}, 0x{MsiLast:x}]");
                at = requested;
            }
            else
            {
                CheckRoom(table);
                at = table.PickFree(size) ?? throw ErrnoException.Exhausted(Errno.ENOSPC, $"no free IOVA range of 0x{size:x} bytes");
            }
            var block = memory.Pin(vaddr, size);
            Volatile.Write(ref _table, table.Insert(new IovaMapping(at, size, block, vaddr, read, write)));
            return at;
        }
    }

    /// <summary>
    /// Unmaps and returns the bytes unmapped. Returns only once every device access that could
    /// use the range has finished; accesses to other mappings do not hold it up.
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

        lock (_changes)
        {
            var table = _table;
            var first = table.FindFirstOverlap(iova, last);
            if (first < 0)
                return rules == UnmapRules.Iommufd ? throw ErrnoException.NotFound(Errno.ENOENT, $"nothing is mapped in [0x{iova:x}, 0x{last:x}]") : 0UL;
            var end = first;
            while (end < table.Count && table.Items[end].Iova <= last)
                end++;
            var head = table.Items[first];
            var tail = table.Items[end - 1];
            if (head.Iova < iova || tail.Last > last)
            {
                var bisected = head.Iova < iova ? head : tail;
                throw rules == UnmapRules.Iommufd
                    ? ErrnoException.NotFound(Errno.ENOENT, $"[0x{iova:x}, 0x{last:x}] only partly covers the mapping [0x{bisected.Iova:x}, 0x{bisected.Last:x}]")
                    : ErrnoException.Invalid($"[0x{iova:x}, 0x{last:x}] would bisect the mapping [0x{bisected.Iova:x}, 0x{bisected.Last:x}]");
            }
            Volatile.Write(ref _table, table.Remove(first, end - first));
            return Retire(memory, table.Items.AsSpan(first, end - first));
        }
    }

    /// <summary>Removes every mapping (unmap all, container emptied or destroyed); returns once no device access uses any of them.</summary>
    public ulong Clear(SessionMemory memory)
    {
        lock (_changes)
        {
            var table = _table;
            Volatile.Write(ref _table, Table.Empty);
            return Retire(memory, table.Items.AsSpan(0, table.Count));
        }
    }

    /// <summary>How many more mappings fit.</summary>
    public int Available => DmaLimit - Count;

    // Mappings just taken out of the published table: no access can find them any more; mark them
    // removed so none that found them earlier can enter, wait for those already in, then unpin.
    private static ulong Retire(SessionMemory memory, ReadOnlySpan<IovaMapping> removed)
    {
        ulong unmapped = 0;
        foreach (var m in removed)
            m.MarkRemoved();
        foreach (var m in removed)
        {
            m.WaitDrained();
            memory.Unpin(m.Block);
            unmapped += m.Size;
        }
        return unmapped;
    }

    // ---- the device side: no lock, the current table and the mappings' access counts ----

    /// <summary>The device writes <paramref name="data"/> at <paramref name="iova"/>: every page is checked before any byte lands.</summary>
    internal DmaOutcome DeviceWrite(ulong iova, ReadOnlySpan<byte> data)
    {
        using var access = Enter(iova, (ulong)data.Length, DmaAccess.Write, out var outcome);
        if (outcome.Ok)
            access.Write(iova, data);
        return outcome;
    }

    /// <summary>As <see cref="DeviceWrite"/>, with the bytes produced in place by <paramref name="fill"/> once every page is checked.</summary>
    internal DmaOutcome DeviceFill<TState>(ulong iova, int length, DmaFill<TState> fill, TState state)
    {
        using var access = Enter(iova, (ulong)length, DmaAccess.Write, out var outcome);
        if (outcome.Ok)
            access.Fill(iova, length, fill, state);
        return outcome;
    }

    /// <summary>The device reads host memory at <paramref name="iova"/> into <paramref name="destination"/>.</summary>
    internal DmaOutcome DeviceRead(ulong iova, Span<byte> destination)
    {
        using var access = Enter(iova, (ulong)destination.Length, DmaAccess.Read, out var outcome);
        if (outcome.Ok)
            access.Read(iova, destination);
        return outcome;
    }

    /// <summary>
    /// The device's copy engine, through <paramref name="buffer"/> (the copy's length): every page of
    /// the source and then of the destination is checked before a byte moves.
    /// </summary>
    internal DmaOutcome DeviceCopy(ulong sourceIova, ulong destinationIova, Span<byte> buffer)
    {
        using var source = Enter(sourceIova, (ulong)buffer.Length, DmaAccess.Read, out var outcome);
        if (!outcome.Ok)
            return outcome;
        using var destination = Enter(destinationIova, (ulong)buffer.Length, DmaAccess.Write, out outcome);
        if (outcome.Ok)
        {
            source.Read(sourceIova, buffer);
            destination.Write(destinationIova, buffer);
        }
        return outcome;
    }

    /// <summary>Checks every page of the range against the current table, in order; the first that fails is the fault.</summary>
    internal DmaOutcome Check(ulong iova, ulong length, DmaAccess access) =>
        Volatile.Read(ref _table).Walk(iova, length, access, out _, out _);

    // Translates the range through the current table and counts the access into every mapping it
    // uses (dispose the result to count it out; on a fault it holds none). A mapping removed since
    // the table was read refuses it; the table that removed it is already published, so the next
    // look finds it gone (or its range mapped anew).
    private Entered Enter(ulong iova, ulong length, DmaAccess access, out DmaOutcome outcome)
    {
        while (true)
        {
            var table = Volatile.Read(ref _table);
            outcome = table.Walk(iova, length, access, out var first, out var last);
            // On a fault the walk gives first = last = -1: nothing entered, nothing to leave.
            var entered = new Entered(table, first, last);
            if (!outcome.Ok || entered.TryEnter())
                return entered;
        }
    }

    /// <summary>The mappings <c>[first, last]</c> of one table that one access has entered (none when first is -1).</summary>
    private readonly struct Entered(Table table, int first, int last) : IDisposable
    {
        public bool TryEnter()
        {
            for (var i = first; i <= last && i >= 0; i++)
            {
                if (table.Items[i].TryEnter())
                    continue;
                for (var j = first; j < i; j++)
                    table.Items[j].Exit();
                return false;
            }
            return true;
        }

        public void Dispose()
        {
            for (var i = first; i <= last && i >= 0; i++)
                table.Items[i].Exit();
        }

        public void Write(ulong at, ReadOnlySpan<byte> data)
        {
            for (var i = first; !data.IsEmpty;)
            {
                var bytes = Next(ref i, ref at, data.Length);
                data[..bytes.Length].CopyTo(bytes);
                data = data[bytes.Length..];
            }
        }

        public void Fill<TState>(ulong at, int length, DmaFill<TState> fill, TState state)
        {
            for (int i = first, done = 0; done < length;)
            {
                var bytes = Next(ref i, ref at, length - done);
                fill(bytes, done, state);
                done += bytes.Length;
            }
        }

        public void Read(ulong at, Span<byte> destination)
        {
            for (var i = first; !destination.IsEmpty;)
            {
                var bytes = Next(ref i, ref at, destination.Length);
                bytes.CopyTo(destination);
                destination = destination[bytes.Length..];
            }
        }

        // Mapping i's part of the access from `at`, at most `max` bytes; moves on to the next mapping.
        private Span<byte> Next(ref int i, ref ulong at, int max)
        {
            var m = table.Items[i++];
            var n = (int)Math.Min((ulong)max, m.Last - at + 1);
            var bytes = m.Bytes(at, n);
            at += (ulong)n;
            return bytes;
        }
    }

    private void CheckRoom(Table table)
    {
        if (table.Count >= DmaLimit)
            throw ErrnoException.Exhausted(Errno.ENOSPC, $"the container already has {table.Count} mappings, its dma_avail limit");
    }

    private static bool IsUsable(ulong first, ulong last) =>
        last <= ApertureLast && (last < MsiFirst || first > MsiLast);

    // Moves a candidate past the reserved window if it would touch it; false if it leaves the aperture.
    private static bool Fits(ref ulong candidate, ulong size)
    {
        if (candidate <= MsiLast && candidate + size - 1 >= MsiFirst)
            candidate = MsiLast + 1;
        return candidate + size - 1 >= candidate && candidate + size - 1 <= ApertureLast;
    }

    /// <summary>
    /// The mappings sorted by IOVA: <see cref="Items"/> [0, <see cref="Count"/>) never change once
    /// the table is published. A new table may share the array only by appending past Count (no
    /// published table shows those slots); every other change copies.
    /// </summary>
    private sealed class Table(IovaMapping[] items, int count)
    {
        public static readonly Table Empty = new([], 0);

        public IovaMapping[] Items { get; } = items;
        public int Count { get; } = count;

        /// <summary>Checks every page of the range, in order; the first that fails is the fault. On success, the range lies in the adjacent mappings [first, last].</summary>
        public DmaOutcome Walk(ulong iova, ulong length, DmaAccess access, out int first, out int last)
        {
            first = last = -1;
            if (length == 0)
                return DmaOutcome.Success;
            var end = iova + length - 1;
            // A range that wraps starts above the aperture, so its first page is unmapped. One that runs
            // past the aperture needs no special case: nothing is mapped there, so the walk faults at the
            // first page that is not mapped, which may come before the aperture's end.
            if (end < iova)
                return DmaOutcome.Faulted(iova & ~PageMask, access, FaultReason.Unmapped);
            var index = FindContaining(iova);
            var at = iova;
            var start = index;
            while (true)
            {
                if (index < 0)
                    return DmaOutcome.Faulted(at & ~PageMask, access, FaultReason.Unmapped);
                var m = Items[index];
                if (!m.Allows(access))
                    return DmaOutcome.Faulted(at & ~PageMask, access, FaultReason.Permission);
                if (m.Last >= end)
                {
                    (first, last) = (start, index);
                    return DmaOutcome.Success;
                }
                at = m.Last + 1;
                // Sorted and disjoint: the next page is mapped only if the next mapping starts there.
                index = index + 1 < Count && Items[index + 1].Iova == at ? index + 1 : -1;
            }
        }

        // The index of the mapping containing iova, or -1.
        private int FindContaining(ulong iova)
        {
            int lo = 0, hi = Count - 1;
            while (lo <= hi)
            {
                var mid = (lo + hi) >>> 1;
                var m = Items[mid];
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
        public int FindFirstOverlap(ulong first, ulong last)
        {
            // The first mapping whose Last >= first.
            int lo = 0, hi = Count;
            while (lo < hi)
            {
                var mid = (lo + hi) >>> 1;
                if (Items[mid].Last < first)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            return lo < Count && Items[lo].Iova <= last ? lo : -1;
        }

        // Lowest-address-first search would be O(n) per map; try above the highest mapping first.
        public ulong? PickFree(ulong size)
        {
            var candidate = Count == 0 ? PageSize : Items[Count - 1].Last + 1;
            if (Fits(ref candidate, size))
                return candidate;
            candidate = PageSize;
            for (var i = 0; i <= Count; i++)
            {
                var limit = i < Count ? Items[i].Iova : ApertureLast + 1;
                if (Fits(ref candidate, size) && candidate + size <= limit)
                    return candidate;
                if (i < Count)
                    candidate = Math.Max(candidate, Items[i].Last + 1);
            }
            return null;
        }

        /// <summary>This table with <paramref name="mapping"/> added; an append shares the array when it has room.</summary>
        public Table Insert(IovaMapping mapping)
        {
            int lo = 0, hi = Count;
            while (lo < hi)
            {
                var mid = (lo + hi) >>> 1;
                if (Items[mid].Iova < mapping.Iova)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            if (lo == Count && Count < Items.Length)
            {
                // The slot past Count is in no published table, so no access can be reading it.
                Items[Count] = mapping;
                return new Table(Items, Count + 1);
            }
            var items = new IovaMapping[Math.Max(16, Count == Items.Length ? Count * 2 : Items.Length)];
            Array.Copy(Items, items, lo);
            items[lo] = mapping;
            Array.Copy(Items, lo, items, lo + 1, Count - lo);
            return new Table(items, Count + 1);
        }

        /// <summary>This table without the mappings [index, index + count), in a new array (accesses may still be reading this one).</summary>
        public Table Remove(int index, int count)
        {
            var left = Count - count;
            if (left == 0)
                return Empty;
            var items = new IovaMapping[Math.Max(16, left + left / 2)];
            Array.Copy(Items, items, index);
            Array.Copy(Items, index + count, items, index, left - index);
            return new Table(items, left);
        }
    }
}
