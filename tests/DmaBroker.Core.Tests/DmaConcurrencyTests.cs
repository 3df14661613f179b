using System.Collections.Concurrent;
using DmaBroker.Core.Devices;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Core.Tests;

/// <summary>
/// SPEC §4 "when UnmapDma returns, no DMA touches that range any more" and §5/§10.4 "no DMA of a
/// dead session is ever applied after its ownership has been released", with real threads: four
/// edu devices (each in its own group, so their accesses really run in parallel) write while the
/// mapping or the whole session goes away. Nothing sleeps; phases are handed over with barriers
/// and events, and every check is on memory read directly, behind the broker's back.
/// </summary>
[Collection(RealThreadsCollection.Name)]
public sealed class DmaConcurrencyTests
{
    private const ulong Page = DmaRig.Page;
    private const int Devices = 4;
    private const ulong Iova = 0x100000;
    private const ulong Size = 4 * Page;

    /// <summary>
    /// Each round: map, let every device land writes, unmap while they keep writing, zero the memory
    /// the moment UnmapDma returns, let every device make more attempts (all must fault UNMAPPED),
    /// then the memory must still be all zero.
    /// </summary>
    [Theory]
    [InlineData(ContainerType.Type1v2)]
    [InlineData(ContainerType.Iommufd)]
    public async Task UnmapDma_WhileFourDevicesWriteIntoTheRange_NoWriteLandsAfterItReturns(ContainerType flavour)
    {
        const int rounds = 25;
        const int attemptsAfterUnmap = 16;
        await using var rig = DmaRig.Create(flavour, claimed: Devices);
        var block = rig.Allocate(Size);
        var handles = Enumerable.Range(0, Devices).Select(i => rig.Open(i)).ToArray();
        var failures = new ConcurrentQueue<string>();
        using var abort = new CancellationTokenSource();
        using var roundStart = new Barrier(Devices + 1);
        using var roundEnd = new Barrier(Devices + 1);
        using var landed = new CountdownEvent(Devices);
        var unmapped = 0; // 1 once this round's UnmapDma has returned and the memory was zeroed

        var writers = handles.Select((handle, w) => Run(failures, abort, () =>
        {
            var rng = new Random(w);
            var marker = Enumerable.Repeat((byte)(0xa0 + w), 64).ToArray();
            for (var round = 0; round < rounds; round++)
            {
                Together(roundStart, abort.Token);
                var first = true;
                var after = 0;
                while (after < attemptsAfterUnmap)
                {
                    var late = Volatile.Read(ref unmapped) == 1;
                    // Some writes straddle two pages, so a write can be half-way through when the unmap comes.
                    var at = Iova + (ulong)rng.Next((int)Size - marker.Length);
                    var outcome = handle.DmaWrite(at, marker);
                    if (late)
                    {
                        after++;
                        if (outcome.Ok || outcome.Reason != FaultReason.Unmapped)
                            failures.Enqueue($"round {round}, device {w}: a write started after UnmapDma returned came back {outcome}");
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
            for (var round = 0; round < rounds; round++)
            {
                rig.Map(block.Vaddr, Iova, Size);
                landed.Reset();
                Volatile.Write(ref unmapped, 0);
                Together(roundStart, abort.Token);
                if (!landed.Wait(CoreState.Timeout, abort.Token))
                    throw new TimeoutException("the devices never got their writes in");

                var bytes = rig.Unmap(Iova, Size);
                block.Bytes.AsSpan().Clear();
                Volatile.Write(ref unmapped, 1);
                if (bytes != Size)
                    failures.Enqueue($"round {round}: UnmapDma returned 0x{bytes:x}");

                Together(roundEnd, abort.Token);
                // Recorded, not asserted, so the writers are not left waiting at the next barrier.
                var late = Array.FindIndex(block.Bytes, b => b != 0);
                if (late >= 0)
                    failures.Enqueue($"round {round}: byte {late} became 0x{block.Bytes[late]:x2} after UnmapDma returned");
            }
        });
        await Task.WhenAll([unmapper, .. writers]).WaitAsync(CoreState.Timeout);
        Assert.True(failures.IsEmpty, string.Join('\n', failures.Take(20)));
    }

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
