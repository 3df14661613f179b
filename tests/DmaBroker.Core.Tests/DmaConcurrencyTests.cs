using System.Buffers.Binary;
using System.Collections.Concurrent;
using DmaBroker.Core.Devices;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Memory;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Core.Tests;

/// <summary>
/// SPEC §4 "when UnmapDma returns, no DMA touches that range any more" and §5/§10.4 "no DMA of a
/// dead session is ever applied after its ownership has been released", with real threads: four
/// edu devices (each in its own group, so their accesses really run in parallel) write while the
/// mapping or the whole session goes away; and, for the lock-free device side of an IOVA space
/// (docs/locking.md, lock 5), threads mapping, unmapping and accessing one table at once, each
/// checked against a model. Nothing sleeps; phases are handed over with barriers and events, and
/// every check is on memory read directly, behind the broker's back.
/// </summary>
[Collection(RealThreadsCollection.Name)]
public sealed class DmaConcurrencyTests
{
    private const ulong Page = DmaRig.Page;
    private const int Devices = 4;
    private const ulong Iova = 0x100000;
    private const ulong Size = 4 * Page;

    /// <summary>
    /// Each round: map the range (as one mapping, or as four adjacent ones), let every device land an
    /// access, unmap the whole range in one call while they keep going, and record its bytes the
    /// moment UnmapDma returns; let every device make more attempts (all must fault UNMAPPED at the
    /// access's first page), then the bytes must be exactly as recorded. Small writes hit the range
    /// often; large ones (up to 24 pages, often spanning two or three mappings, and with the fourth
    /// device copying rather than writing) are in flight for long. Every access carries a stamp no
    /// other uses, so a late one cannot hide.
    /// </summary>
    [Theory]
    [InlineData(ContainerType.Type1v2, 1, 64)]
    [InlineData(ContainerType.Iommufd, 1, 64)]
    [InlineData(ContainerType.Type1v2, 4, 24 * 4096)]
    [InlineData(ContainerType.Iommufd, 4, 24 * 4096)]
    public async Task UnmapDma_WhileFourDevicesWriteIntoTheRange_NoWriteLandsAfterItReturns(ContainerType flavour, int mappings, int maxLength)
    {
        const int rounds = 40;
        const int attemptsAfterUnmap = 8;
        var large = (ulong)maxLength > Page;
        var size = large ? 64 * Page : Size;
        var sourceIova = 0x4000_0000UL; // where the copying device stamps what it copies: mapped throughout
        await using var rig = DmaRig.Create(flavour, claimed: Devices);
        var block = rig.Allocate(size);
        var source = rig.Allocate((ulong)maxLength);
        rig.Map(source.Vaddr, sourceIova, source.Size);
        var handles = Enumerable.Range(0, Devices).Select(i => rig.Open(i)).ToArray();
        var failures = new ConcurrentQueue<string>();
        using var abort = new CancellationTokenSource();
        using var roundStart = new Barrier(Devices + 1);
        using var roundEnd = new Barrier(Devices + 1);
        using var landed = new CountdownEvent(Devices);
        var unmapped = 0; // 1 once this round's UnmapDma has returned and the bytes were recorded

        var writers = handles.Select((handle, w) => Run(failures, abort, () =>
        {
            var rng = new Random(w);
            var data = new byte[maxLength];
            var stamp = (ulong)w << 48;
            var copies = large && w == Devices - 1;
            for (var round = 0; round < rounds; round++)
            {
                Together(roundStart, abort.Token);
                var first = true;
                var after = 0;
                while (after < attemptsAfterUnmap)
                {
                    var late = Volatile.Read(ref unmapped) == 1;
                    // Some accesses straddle two pages (or mappings), so one can be half-way through when the unmap comes.
                    var length = large ? rng.Next(8, maxLength + 1) : maxLength;
                    var at = Iova + (ulong)rng.Next((int)size - length + 1);
                    stamp++;
                    for (var i = 0; i + 8 <= length; i += 8)
                        BinaryPrimitives.WriteUInt64LittleEndian(data.AsSpan(i), stamp);
                    if (copies && !handle.DmaWrite(sourceIova, data.AsSpan(0, length)).Ok)
                        failures.Enqueue($"round {round}: the copy's source write faulted");
                    var outcome = copies ? handle.DmaCopy(sourceIova, at, length) : handle.DmaWrite(at, data.AsSpan(0, length));
                    if (late)
                    {
                        after++;
                        if (outcome.Ok || outcome.Reason != FaultReason.Unmapped || outcome.FaultIova != (at & ~(Page - 1)))
                            failures.Enqueue($"round {round}, device {w}: an access started after UnmapDma returned came back {outcome}");
                    }
                    else if (outcome.Ok && first)
                    {
                        first = false;
                        landed.Signal();
                    }
                    else if (!outcome.Ok && outcome.Reason != FaultReason.Unmapped)
                    {
                        failures.Enqueue($"round {round}, device {w}: {outcome}");
                    }
                }
                Together(roundEnd, abort.Token);
            }
        })).ToArray();

        // The unmapping side runs on its own thread too: the test's thread-pool thread never blocks.
        var unmapper = Run(failures, abort, () =>
        {
            var each = size / (ulong)mappings;
            for (var round = 0; round < rounds; round++)
            {
                for (var m = 0UL; m < (ulong)mappings; m++)
                    rig.Map(block.Vaddr + m * each, Iova + m * each, each);
                landed.Reset();
                Volatile.Write(ref unmapped, 0);
                Together(roundStart, abort.Token);
                if (!landed.Wait(CoreState.Timeout, abort.Token))
                    throw new TimeoutException("the devices never got their writes in");

                var bytes = rig.Unmap(Iova, size);
                var recorded = Bytes(block);
                Volatile.Write(ref unmapped, 1);
                if (bytes != size)
                    failures.Enqueue($"round {round}: UnmapDma returned 0x{bytes:x}");

                Together(roundEnd, abort.Token);
                // Recorded, not asserted, so the writers are not left waiting at the next barrier.
                var now = Bytes(block);
                var late = now.AsSpan().CommonPrefixLength(recorded);
                if (late < now.Length)
                    failures.Enqueue($"round {round}: byte {late} became 0x{now[late]:x2} (was 0x{recorded[late]:x2}) after UnmapDma returned");
                if (block.Pins != 0)
                    failures.Enqueue($"round {round}: the block is still pinned {block.Pins} time(s) after UnmapDma returned");
            }
        });
        await Task.WhenAll([unmapper, .. writers]).WaitAsync(CoreState.Timeout);
        Assert.True(failures.IsEmpty, string.Join('\n', failures.Take(20)));
        Assert.Equal(1, rig.Container.Iova.Count);
    }

    /// <summary>
    /// Four threads, each a device with an IOVA region of its own in one container, run random
    /// sequences of map, unmap, write, read and copy, each checked against that thread's model of its
    /// region (mappings with permissions, and the bytes behind them). The threads share one table, so
    /// every change one makes (appending, inserting, removing: copies and shared arrays) races the
    /// others' lookups; a mapping of one thread must never seem to vanish, appear or move for another.
    /// </summary>
    [Theory]
    [InlineData(ContainerType.Type1v2)]
    [InlineData(ContainerType.Iommufd)]
    public async Task MapUnmapAndAccesses_FromFourThreadsOnOneTable_AgreeWithEachThreadsModel(ContainerType flavour)
    {
        const int steps = 4000;
        await using var rig = DmaRig.Create(flavour, claimed: Devices);
        var failures = new ConcurrentQueue<string>();
        using var abort = new CancellationTokenSource();
        var seen = new ConcurrentDictionary<string, int>();
        var threads = Enumerable.Range(0, Devices).Select(d =>
        {
            var region = new RegionModel(rig, rig.Open(d), Iova + (ulong)d * 0x100_0000, seed: d + (int)flavour * 100);
            return Run(failures, abort, () =>
            {
                for (var step = 0; step < steps && failures.IsEmpty; step++)
                {
                    if (region.Step() is { } problem)
                        failures.Enqueue($"device {d}, step {step}: {problem}");
                }
                foreach (var kind in region.Outcomes)
                    seen[kind] = 1;
                region.UnmapAll();
            });
        }).ToArray();
        await Task.WhenAll(threads).WaitAsync(CoreState.Timeout);
        Assert.True(failures.IsEmpty, string.Join('\n', failures.Take(20)));
        // The sequences must have reached every outcome, or the test proves little.
        string[] required = ["map", "unmap", "unmap bisect", "unmap none", "write ok", "write Unmapped", "write Permission",
            "read ok", "read Unmapped", "read Permission", "copy ok", "copy Unmapped", "copy Permission", "multi-mapping ok"];
        Assert.Empty(required.Except(seen.Keys));
        Assert.Equal(0, rig.Container.Iova.Count);
    }

    /// <summary>
    /// One thread's region: 32 pages of IOVA backed page for page by one block, mapped in runs of 1
    /// to 4 pages with random permissions. The model is the region's pages (which mapping covers
    /// each, and its permissions) and the block's bytes.
    /// </summary>
    private sealed class RegionModel(DmaRig rig, DeviceHandle device, ulong iovaBase, int seed)
    {
        private const int Pages = 32;
        private readonly Random _rng = new(seed);
        private readonly MemoryBlock _block = rig.Allocate(Pages * Page);
        private readonly byte[] _shadow = new byte[Pages * Page];
        // Per page: the mapping's first page (or -1) and its permissions.
        private readonly int[] _start = Enumerable.Repeat(-1, Pages).ToArray();
        private readonly (bool Read, bool Write)[] _perm = new (bool, bool)[Pages];

        public HashSet<string> Outcomes { get; } = [];

        /// <summary>Runs one random operation; a description of the disagreement, or null.</summary>
        public string? Step() => _rng.Next(6) switch
        {
            0 => Map(),
            1 => Unmap(),
            2 or 3 => Write(),
            4 => Read(),
            _ => Copy(),
        };

        public void UnmapAll()
        {
            for (var p = 0; p < Pages; p++)
            {
                if (_start[p] == p)
                    rig.Unmap(iovaBase + (ulong)p * Page, (ulong)Length(p) * Page);
            }
        }

        private string? Map()
        {
            var first = _rng.Next(Pages);
            var pages = Math.Min(_rng.Next(1, 5), Pages - first);
            if (Enumerable.Range(first, pages).Any(p => _start[p] >= 0))
                return null; // EEXIST is the single-threaded model tests' business
            var read = _rng.Next(4) != 0;
            var write = !read || _rng.Next(3) != 0;
            rig.Map(_block.Vaddr + (ulong)first * Page, iovaBase + (ulong)first * Page, (ulong)pages * Page, read, write);
            for (var p = first; p < first + pages; p++)
                (_start[p], _perm[p]) = (first, (read, write));
            Outcomes.Add("map");
            return null;
        }

        private string? Unmap()
        {
            var first = _rng.Next(Pages);
            var pages = Math.Min(_rng.Next(1, 9), Pages - first);
            var last = first + pages - 1;
            var covered = Enumerable.Range(first, pages).Where(p => _start[p] >= 0).ToList();
            var bisects = covered.Count > 0 && (_start[covered[0]] < first || _start[covered[^1]] + Length(_start[covered[^1]]) - 1 > last);
            var errno = CoreState.ErrnoOf(() => rig.Unmap(iovaBase + (ulong)first * Page, (ulong)pages * Page));
            Errno? expected = bisects ? (rig.Flavour == ContainerType.Iommufd ? Errno.ENOENT : Errno.EINVAL)
                : covered.Count == 0 && rig.Flavour == ContainerType.Iommufd ? Errno.ENOENT : null;
            if (errno != expected)
                return $"UnmapDma of pages [{first}, {last}] gave {errno?.ToString() ?? "ok"}, the model says {expected?.ToString() ?? "ok"}";
            Outcomes.Add(bisects ? "unmap bisect" : covered.Count == 0 ? "unmap none" : "unmap");
            if (!bisects)
            {
                foreach (var p in covered)
                    _start[p] = -1;
            }
            return null;
        }

        private string? Write()
        {
            var (offset, length) = Range();
            var data = new byte[length];
            _rng.NextBytes(data);
            var outcome = device.DmaWrite(iovaBase + offset, data);
            var problem = Agree("write", outcome, Expect(offset, length, DmaAccess.Write), offset, length);
            if (outcome.Ok)
                data.CopyTo(_shadow, (int)offset);
            return problem ?? CompareMemory();
        }

        private string? Read()
        {
            var (offset, length) = Range();
            var data = new byte[length];
            var outcome = device.DmaRead(iovaBase + offset, data);
            var problem = Agree("read", outcome, Expect(offset, length, DmaAccess.Read), offset, length);
            if (problem is null && outcome.Ok && !data.AsSpan().SequenceEqual(_shadow.AsSpan((int)offset, length)))
                problem = $"a read of [{offset}, +{length}) returned bytes other than the model's";
            return problem;
        }

        private string? Copy()
        {
            var (from, length) = Range();
            var to = (ulong)_rng.Next((int)(Pages * Page) - length + 1);
            var outcome = device.DmaCopy(iovaBase + from, iovaBase + to, length);
            var expected = Expect(from, length, DmaAccess.Read);
            if (expected.Ok)
                expected = Expect(to, length, DmaAccess.Write);
            var problem = Agree("copy", outcome, expected, to, length);
            if (outcome.Ok)
                _shadow.AsSpan((int)from, length).ToArray().CopyTo(_shadow, (int)to);
            return problem ?? CompareMemory();
        }

        // A random access inside the region, often spanning pages.
        private (ulong Offset, int Length) Range()
        {
            var length = _rng.Next(1, 3 * (int)Page);
            return ((ulong)_rng.Next((int)(Pages * Page) - length + 1), length);
        }

        private int Length(int start)
        {
            var n = 0;
            while (start + n < Pages && _start[start + n] == start)
                n++;
            return n;
        }

        // The model's verdict: walk the pages in order; the first unmapped or forbidden page faults.
        private DmaOutcome Expect(ulong offset, int length, DmaAccess access)
        {
            for (var p = (int)(offset / Page); p <= (int)((offset + (ulong)length - 1) / Page); p++)
            {
                var at = iovaBase + Math.Max((ulong)p * Page, offset);
                if (_start[p] < 0)
                    return DmaOutcome.Faulted(at & ~(Page - 1), access, FaultReason.Unmapped);
                if (!(access == DmaAccess.Write ? _perm[p].Write : _perm[p].Read))
                    return DmaOutcome.Faulted(at & ~(Page - 1), access, FaultReason.Permission);
            }
            return DmaOutcome.Success;
        }

        private string? Agree(string what, DmaOutcome actual, DmaOutcome expected, ulong offset, int length)
        {
            if (actual != expected)
                return $"{what} at [{offset}, +{length}) came back {actual}, the model says {expected}";
            Outcomes.Add(actual.Ok ? $"{what} ok" : $"{what} {actual.Reason}");
            if (actual.Ok && _start[(int)(offset / Page)] != _start[(int)((offset + (ulong)length - 1) / Page)])
                Outcomes.Add("multi-mapping ok");
            return null;
        }

        private string? CompareMemory()
        {
            var bytes = _block.Slice(_block.Vaddr, _shadow.Length);
            var i = FirstDifference(bytes, _shadow);
            return i < 0 ? null : $"memory byte {i} is 0x{bytes[i]:x2}, the model says 0x{_shadow[i]:x2}";
        }
    }

    /// <summary>The index of the first byte where the two differ, or -1.</summary>
    private static int FirstDifference(ReadOnlySpan<byte> a, ReadOnlySpan<byte> b)
    {
        var common = a.CommonPrefixLength(b);
        return common == a.Length && common == b.Length ? -1 : common;
    }

    /// <summary>The block's bytes as the session holds them, read directly.</summary>
    private static byte[] Bytes(MemoryBlock block) => block.Slice(block.Vaddr, (int)block.Size).ToArray();

    /// <summary>
    /// A session's four devices write (and copy) flat out; the session ends. Every DMA call made after
    /// EndAsync completes must be refused, the memory must not change after the journal shows the
    /// groups released, and the next owner of the groups must find the devices reset.
    /// </summary>
    [Fact]
    public async Task EndAsync_DuringHeavyDma_NothingLandsAfterReleaseAndTheNextOwnerFindsDevicesReset()
    {
        const int attemptsAfterEnd = 50;
        await using var rig = DmaRig.Create(ContainerType.Type1v2, claimed: Devices);
        var broker = rig.Broker;
        var victim = rig.Session;
        var block = rig.Allocate(Size);
        rig.Map(block.Vaddr, Iova, Size);
        var handles = Enumerable.Range(0, Devices).Select(i => rig.Open(i)).ToArray();
        foreach (var h in handles)
        {
            // Leave state behind in every device for the next owner to (not) find.
            Assert.True(h.MmioWrite(0, EduDevice.RegLiveness, 4, 0x1234).Ok);
            Assert.True(h.MmioWrite(0, EduDevice.RegFactorial, 4, 6).Ok);
            Assert.True(h.MmioWrite(0, EduDevice.RegIrqRaise, 4, 0x40).Ok);
            Assert.True(h.MmioWrite(0, EduDevice.RegDmaSource, 8, Iova).Ok);
            Assert.True(h.MmioWrite(0, EduDevice.RegDmaDestination, 8, EduDevice.DmaStart).Ok);
            Assert.True(h.MmioWrite(0, EduDevice.RegDmaCount, 8, 64).Ok);
            Assert.True(h.MmioWrite(0, EduDevice.RegDmaCommand, 8, EduDevice.DmaCommandStart).Ok);
        }
        var released = WatchForRelease(broker, block);
        var failures = new ConcurrentQueue<string>();
        using var start = new Barrier(Devices);
        var flowing = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var writing = Devices;
        var ended = 0;

        var writers = handles.Select((handle, w) => Run(() =>
        {
            var rng = new Random(100 + w);
            var marker = Enumerable.Repeat((byte)(0xb0 + w), 256).ToArray();
            var refusedAfterEnd = 0;
            var first = true;
            Together(start);
            while (refusedAfterEnd < attemptsAfterEnd)
            {
                var late = Volatile.Read(ref ended) == 1;
                var at = Iova + (ulong)rng.Next((int)Size - marker.Length);
                try
                {
                    var outcome = rng.Next(4) == 0
                        ? handle.DmaCopy(at, Iova + (ulong)rng.Next((int)Size - marker.Length), marker.Length)
                        : handle.DmaWrite(at, marker);
                    if (late)
                        failures.Enqueue($"device {w}: a DMA call made after EndAsync completed came back {outcome}");
                    else if (!outcome.Ok)
                        failures.Enqueue($"device {w}: {outcome} while the session was alive");
                    else if (first)
                    {
                        first = false;
                        if (Interlocked.Decrement(ref writing) == 0)
                            flowing.TrySetResult();
                    }
                }
                catch (ErrnoException e)
                {
                    if (e.Kind != ErrorKind.Unauthenticated)
                        failures.Enqueue($"device {w}: refused with {e.Errno}/{e.Kind}, not as unauthenticated: {e.Message}");
                    if (late)
                        refusedAfterEnd++;
                }
            }
        })).ToArray();

        await flowing.Task.WaitAsync(CoreState.Timeout);
        await broker.Sessions.EndAsync(victim, SessionEndReason.ConnectionLost).WaitAsync(CoreState.Timeout);
        Volatile.Write(ref ended, 1);
        await Task.WhenAll(writers).WaitAsync(CoreState.Timeout);

        Assert.True(failures.IsEmpty, string.Join('\n', failures.Take(20)));
        var atRelease = await released.WaitAsync(CoreState.Timeout);
        Assert.True(atRelease.AsSpan().SequenceEqual(block.Bytes), "the victim's memory changed after its groups were released");
        Assert.Contains(block.Bytes, b => b != 0); // the writers did write, before the end

        // The next owner: same groups, the devices reset, Bus Master off until it turns it on.
        var next = broker.Sessions.Open("next");
        var container = broker.Vfio.CreateContainer(next, ContainerType.Iommufd);
        var mine = next.Allocate(Page);
        broker.Vfio.MapDma(next, container.Id, mine.Vaddr, Iova, Page, true, true);
        for (var i = 0; i < Devices; i++)
        {
            broker.Vfio.BindDevice(next, DmaRig.Edus[i], container.Id);
            Assert.Equal(2ul, CoreState.Group(broker, DmaRig.EduGroups[i]).Generation);
            var handle = broker.Vfio.OpenDevice(next, DmaRig.Edus[i]);
            EduDeviceTests.AssertReset(handle);
            Assert.Equal(FaultReason.BusMasterOff, handle.DmaWrite(Iova, [1]).Reason);
        }
        CoreState.AssertInvariants(broker);
    }

    /// <summary>
    /// MapDma racing what ends a container's IOMMU: the unset of a TYPE1V2 container's last group
    /// (which empties it), or DestroyContainer of an IOMMUFD one. Whichever wins, no mapping may
    /// survive in a container that has no IOMMU or is gone, pinning memory nothing can unmap.
    /// </summary>
    [Theory]
    [InlineData(ContainerType.Type1v2)]
    [InlineData(ContainerType.Iommufd)]
    public async Task MapDma_RacingTheEndOfTheContainersIommu_NeverLeavesMemoryPinned(ContainerType flavour)
    {
        const int iterations = 1000;
        await using var rig = DmaRig.Create(flavour, claimed: 0);
        var session = rig.Session;
        var vfio = rig.Vfio;
        var block = rig.Allocate(Page);
        using var start = new Barrier(2);
        Errno[] refusals = [Errno.EINVAL, Errno.ENOENT];

        for (var i = 0; i < iterations; i++)
        {
            var container = vfio.CreateContainer(session, flavour);
            if (flavour == ContainerType.Type1v2)
                vfio.SetContainer(session, DmaRig.EduGroups[0], container.Id);
            var map = Run(() =>
            {
                Together(start);
                var errno = CoreState.ErrnoOf(() => vfio.MapDma(session, container.Id, block.Vaddr, Iova, Page, true, true));
                Assert.True(errno is null || refusals.Contains(errno.Value), $"MapDma failed with {errno}");
            });
            var end = Run(() =>
            {
                Together(start);
                if (flavour == ContainerType.Type1v2)
                    vfio.UnsetContainer(session, DmaRig.EduGroups[0]);
                else
                    vfio.DestroyContainer(session, container.Id);
            });
            await Task.WhenAll(map, end).WaitAsync(CoreState.Timeout);

            Assert.True(container.Iova.Count == 0 && block.Pins == 0,
                $"iteration {i}: the {flavour} container's IOMMU is gone but it holds {container.Iova.Count} mapping(s) pinning the block {block.Pins} time(s)");
            if (flavour == ContainerType.Type1v2)
                vfio.DestroyContainer(session, container.Id);
        }
        session.Free(block.Vaddr);
    }

    /// <summary>Watches the journal; when every edu group is seen released, takes a copy of the block at that moment.</summary>
    private static Task<byte[]> WatchForRelease(Broker broker, Memory.MemoryBlock block)
    {
        var watcher = broker.Journal.Watch();
        return Task.Run(async () =>
        {
            using (watcher)
            {
                var pending = DmaRig.EduGroups.ToHashSet();
                await foreach (var ev in watcher.ReadAllAsync())
                {
                    if (ev.Change is GroupChanged { Group: { OwnerKind: OwnerKind.None } g })
                        pending.Remove(g.Id);
                    if (pending.Count == 0)
                        return block.Bytes.ToArray();
                }
                throw new InvalidOperationException("the journal ended before the groups were released");
            }
        });
    }

    private static void Together(Barrier barrier, CancellationToken abort = default)
    {
        if (!barrier.SignalAndWait(CoreState.Timeout, abort))
            throw new TimeoutException("a participant never reached the barrier");
    }

    /// <summary>A worker thread that, should it crash, records why and cancels <paramref name="abort"/> so nobody waits for it.</summary>
    private static Task Run(ConcurrentQueue<string> failures, CancellationTokenSource abort, Action body) => Run(() =>
    {
        try
        {
            body();
        }
        catch (OperationCanceledException) when (abort.IsCancellationRequested)
        {
        }
        catch (Exception e)
        {
            failures.Enqueue($"a worker crashed: {e}");
            abort.Cancel();
        }
    });

    private static Task Run(Action body) =>
        Task.Factory.StartNew(body, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
}
