using System.Collections.Concurrent;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Core.Tests;

/// <summary>
/// Real threads against one broker: claims and releases on shared and private groups, DMA-API
/// binds racing them, and a checker that samples every group's invariants under its lock while
/// they run. Threads start together on a <see cref="Barrier"/>; nothing sleeps.
/// </summary>
[Collection(RealThreadsCollection.Name)]
public sealed class ConcurrencyTests
{
    private const int Workers = 4;
    private const int Iterations = 3000;

    // Default topology: group 11 = GPU 03:00.0 (vfio-pci) + audio 03:00.1 (none);
    // group 13 = switch ports + edu 06:00.0 (vfio-pci) + edu 07:00.0 (none); groups 14-17 = one edu each.
    private static readonly uint[] SharedGroups = [11, 13];
    private static readonly PciAddress[] SharedDevices =
        [.. new[] { "0000:03:00.0", "0000:03:00.1", "0000:06:00.0", "0000:07:00.0" }.Select(PciAddress.Parse)];
    private static readonly PciAddress[] KernelTargets = [.. new[] { "0000:03:00.1", "0000:07:00.0" }.Select(PciAddress.Parse)];
    private static readonly string[] KernelDrivers = ["ixgbe", "nvme", "vfio-pci", "pci-stub"];
    private static readonly Errno[] ExpectedRefusals = [Errno.EPERM, Errno.EBUSY, Errno.EINVAL, Errno.ENODEV];

    [Fact]
    public async Task ClaimsAndReleases_ManyThreadsOnSharedAndOwnGroups_KeepInvariantsAndReturnToBaseline()
    {
        await using var broker = new Broker(TopologyDocument.Default(), null, new FakeTimeProvider());
        var baseline = Baseline(broker);
        var failures = new ConcurrentQueue<string>();
        using var start = new Barrier(Workers + 2);
        using var stop = new CancellationTokenSource();

        var workers = Enumerable.Range(0, Workers).Select(i => Run(() => ClaimWorker(broker, i, start, failures))).ToArray();
        var kernel = Run(() => KernelWorker(broker, start, failures, stop.Token));
        var checker = Run(() => Checker(broker, start, failures, stop.Token));
        var freshClaims = (await Task.WhenAll(workers).WaitAsync(CoreState.Timeout)).Sum();
        await stop.CancelAsync();
        await Task.WhenAll(kernel, checker).WaitAsync(CoreState.Timeout);

        Assert.True(failures.IsEmpty, string.Join('\n', failures));
        CoreState.AssertInvariants(broker);
        Assert.Equal(baseline, Baseline(broker));
        // Every grant from owner_cnt 0 bumps its group's generation once, and only grants do.
        Assert.Equal((ulong)freshClaims, broker.Journal.Current.Groups.Values.Aggregate(0ul, (sum, g) => sum + g.Generation));
        Assert.Equal(0, broker.GetStats().UserOwnedGroups);
    }

    [Fact]
    public async Task EndAsync_WhileItsSessionHammersClaims_ReleasesEverythingItHeld()
    {
        await using var broker = new Broker(TopologyDocument.Default(), null, new FakeTimeProvider());
        var victim = broker.Sessions.Open("victim");
        var victimContainer = broker.Vfio.CreateContainer(victim, ContainerType.Type1v2);
        var halfway = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var failures = new ConcurrentQueue<string>();
        using var start = new Barrier(Workers + 1);

        var survivors = Enumerable.Range(1, Workers - 1).Select(i => Run(() => ClaimWorker(broker, i, start, failures))).ToArray();
        var hammer = Run(() =>
        {
            var rng = new Random(99);
            Together(start);
            for (var n = 0; n < Iterations; n++)
            {
                if (n == Iterations / 4)
                    halfway.TrySetResult();
                var group = rng.Next(3) == 0 ? 14u : SharedGroups[rng.Next(SharedGroups.Length)];
                var device = rng.Next(3) == 0 ? PciAddress.Parse("0000:08:00.0") : SharedDevices[rng.Next(SharedDevices.Length)];
                var errno = CoreState.ErrnoOf(() =>
                {
                    switch (rng.Next(4))
                    {
                        case 0: broker.Vfio.SetContainer(victim, group, victimContainer.Id); break;
                        case 1: broker.Vfio.UnsetContainer(victim, group); break;
                        case 2: broker.Vfio.BindDevice(victim, device, victimContainer.Id); break;
                        default: broker.Vfio.UnbindDevice(victim, device); break;
                    }
                });
                // After the end begins every call is refused as unauthenticated (EACCES).
                if (errno is { } e && e != Errno.EACCES && !ExpectedRefusals.Contains(e))
                    failures.Enqueue($"victim: unexpected {e}");
            }
            return 0;
        });
        Together(start);
        await halfway.Task.WaitAsync(CoreState.Timeout);
        await broker.Sessions.EndAsync(victim, SessionEndReason.ConnectionLost).WaitAsync(CoreState.Timeout);
        await Task.WhenAll([.. survivors, hammer]).WaitAsync(CoreState.Timeout);

        Assert.True(failures.IsEmpty, string.Join('\n', failures));
        CoreState.AssertInvariants(broker);
        Assert.DoesNotContain(broker.Journal.Current.Groups.Values, g => g.OwnerSession == victim.Id);
        Assert.Empty(broker.Vfio.ContainersOf(victim));
        Assert.Equal(0, broker.GetStats().UserOwnedGroups);
        Assert.Equal(0, broker.GetStats().Containers);
    }

    [Fact]
    public async Task SetContainer_RacingDestroyContainerOfSameSession_NeverLeavesGroupOwnedByEndedSession()
    {
        await using var broker = new Broker(TopologyDocument.Default(), null, new FakeTimeProvider());
        using var start = new Barrier(2);
        const uint group = 14;
        var device = PciAddress.Parse("0000:09:00.0");

        for (var i = 0; i < 2000; i++)
        {
            var session = broker.Sessions.Open();
            var container = broker.Vfio.CreateContainer(session, i % 2 == 0 ? ContainerType.Type1v2 : ContainerType.Iommufd);
            var claim = Run(() =>
            {
                Together(start);
                CoreState.ErrnoOf(() => broker.Vfio.SetContainer(session, group, container.Id));
                CoreState.ErrnoOf(() => broker.Vfio.BindDevice(session, device, container.Id));
                return 0;
            });
            var destroy = Run(() =>
            {
                Together(start);
                CoreState.ErrnoOf(() => broker.Vfio.DestroyContainer(session, container.Id));
                return 0;
            });
            await Task.WhenAll(claim, destroy).WaitAsync(CoreState.Timeout);

            // Either the claim or the destroy won; whichever did, ending the session releases everything.
            await broker.Sessions.EndAsync(session, SessionEndReason.ClientClosed).WaitAsync(CoreState.Timeout);
            Assert.True(broker.GetStats().UserOwnedGroups == 0, $"iteration {i}: a group is still owned by ended session {session.Id}:\n{CoreState.Render(broker)}");
            Assert.Equal(0, broker.GetStats().Containers);
        }
        CoreState.AssertInvariants(broker);
    }

    /// <summary>
    /// One session hammering claims and releases on the shared groups and on a group of its own;
    /// releases whatever it still holds at the end. Returns how many grants it got from owner_cnt 0.
    /// </summary>
    private static int ClaimWorker(Broker broker, int index, Barrier start, ConcurrentQueue<string> failures)
    {
        var rng = new Random(index);
        var session = broker.Sessions.Open($"worker-{index}");
        var container = broker.Vfio.CreateContainer(session, index % 2 == 0 ? ContainerType.Type1v2 : ContainerType.Iommufd);
        var ownGroup = 14u + (uint)index;
        var ownDevice = new PciAddress(0, (byte)(8 + index), 0, 0);
        var set = new HashSet<uint>();
        var bound = new HashSet<PciAddress>();
        var fresh = 0;

        bool Holds(uint group) =>
            set.Contains(group) || bound.Any(d => broker.Table.GetDevice(d).Group.Id == group);

        void CheckOwned(uint group, string what)
        {
            var g = broker.Table.GetGroup(group);
            lock (g.Sync)
            {
                if (g.Owner != session || g.OwnerCount < 1)
                    failures.Enqueue($"worker {index}: after {what}, group {group} is {g.Describe()} (count {g.OwnerCount})");
            }
        }

        Together(start);
        for (var n = 0; n < Iterations; n++)
        {
            var group = rng.Next(3) == 0 ? ownGroup : SharedGroups[rng.Next(SharedGroups.Length)];
            var device = rng.Next(3) == 0 ? ownDevice : SharedDevices[rng.Next(SharedDevices.Length)];
            var deviceGroup = broker.Table.GetDevice(device).Group.Id;
            try
            {
                switch (rng.Next(4))
                {
                    case 0:
                        broker.Vfio.SetContainer(session, group, container.Id);
                        fresh++;
                        set.Add(group);
                        CheckOwned(group, "SetContainer");
                        break;
                    case 1:
                        broker.Vfio.UnsetContainer(session, group);
                        if (!set.Remove(group))
                            failures.Enqueue($"worker {index}: UnsetContainer of group {group} it never set succeeded");
                        break;
                    case 2:
                        var wasHeld = Holds(deviceGroup);
                        broker.Vfio.BindDevice(session, device, container.Id);
                        fresh += wasHeld ? 0 : 1;
                        bound.Add(device);
                        CheckOwned(deviceGroup, "BindDevice");
                        break;
                    default:
                        broker.Vfio.UnbindDevice(session, device);
                        if (!bound.Remove(device))
                            failures.Enqueue($"worker {index}: UnbindDevice of {device} it never bound succeeded");
                        break;
                }
            }
            catch (ErrnoException e) when (ExpectedRefusals.Contains(e.Errno))
            {
                // Contention: another session holds it, or the kernel does.
            }
        }
        foreach (var d in bound)
            broker.Vfio.UnbindDevice(session, d);
        foreach (var g in set)
            broker.Vfio.UnsetContainer(session, g);
        broker.Vfio.DestroyContainer(session, container.Id);
        return fresh;
    }

    /// <summary>The kernel side: DMA-API and VFIO drivers bound and unbound in the shared groups; leaves them driver-less.</summary>
    private static int KernelWorker(Broker broker, Barrier start, ConcurrentQueue<string> failures, CancellationToken stop)
    {
        var rng = new Random(1000);
        Together(start);
        while (!stop.IsCancellationRequested)
        {
            var device = KernelTargets[rng.Next(KernelTargets.Length)];
            var errno = CoreState.ErrnoOf(() =>
            {
                if (rng.Next(2) == 0)
                    broker.Table.BindDriver(device, KernelDrivers[rng.Next(KernelDrivers.Length)]);
                else
                    broker.Table.UnbindDriver(device);
            });
            if (errno is { } e && e is not (Errno.EBUSY or Errno.EINVAL))
                failures.Enqueue($"kernel: unexpected {e}");
        }
        foreach (var device in KernelTargets)
        {
            if (broker.Table.GetDevice(device).Driver is not null)
                broker.Table.UnbindDriver(device);
        }
        return 0;
    }

    /// <summary>Samples every group's invariants under its lock, as long as the others run.</summary>
    private static int Checker(Broker broker, Barrier start, ConcurrentQueue<string> failures, CancellationToken stop)
    {
        Together(start);
        var problems = new List<string>();
        while (!stop.IsCancellationRequested && problems.Count == 0)
        {
            foreach (var g in broker.Table.Groups)
            {
                lock (g.Sync)
                    CoreState.CheckGroup(broker.Vfio, g, null, problems);
            }
        }
        foreach (var p in problems)
            failures.Enqueue("checker: " + p);
        return 0;
    }

    /// <summary>What must come back once everyone has released: every group's ownership and every device's driver.</summary>
    private static string Baseline(Broker broker)
    {
        var groups = broker.Table.Groups.OrderBy(g => g.Id).Select(g =>
            $"{g.Id}:{g.OwnerKind}({g.OwnerCount}) owner={g.Owner?.Id} {g.Domain} set={broker.Vfio.ContainerSetOn(g)?.Id} attached={g.Attached?.Id} "
            + string.Join(',', g.Devices.Select(d => $"{d.Address}={d.Driver}/{d.BoundBy?.Id}")));
        return string.Join('\n', groups);
    }

    /// <summary>Waits for every participant, so the threads start their work at the same moment.</summary>
    private static void Together(Barrier barrier)
    {
        if (!barrier.SignalAndWait(CoreState.Timeout))
            throw new TimeoutException("a participant never reached the start barrier");
    }

    private static Task<int> Run(Func<int> body) =>
        Task.Factory.StartNew(body, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
}
