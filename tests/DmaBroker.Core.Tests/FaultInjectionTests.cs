using DmaBroker.Core.Devices;
using DmaBroker.Core.Faults;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;
using DmaBroker.Core.Vfio;
using Microsoft.Extensions.Time.Testing;

namespace DmaBroker.Core.Tests;

/// <summary>
/// Fault injection (SPEC §14) against the core: each kind at its hook point on edu (and NVMe where
/// the model has one), count and probability semantics, replay by seed, clearing, and refusals that
/// leave nothing armed.
/// </summary>
public sealed class FaultInjectionTests : IAsyncLifetime
{
    private const ulong Page = DmaRig.Page;
    private const ulong Iova = 0x10000;
    private static readonly PciAddress Edu = DmaRig.Edus[0];

    private readonly DmaRig _rig;
    private readonly DeviceHandle _edu;
    private readonly ulong _vaddr;

    public FaultInjectionTests()
    {
        _rig = DmaRig.Create(ContainerType.Type1v2);
        _vaddr = _rig.Allocate(Page).Vaddr;
        _rig.Map(_vaddr, Iova, Page);
        _edu = _rig.Open();
    }

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync() => await _rig.DisposeAsync();

    private Broker Broker => _rig.Broker;

    private FakeTimeProvider Clock => _rig.Clock;

    private InjectedFault Inject(FaultSettings settings, PciAddress? address = null) =>
        Broker.Faults.InjectAsync(address ?? Edu, settings).GetAwaiter().GetResult();

    private bool Write(byte value) => _edu.DmaWrite(Iova, [value]).Ok;

    private byte[] Memory() => _rig.Session.ReadMemory(_vaddr, 1);

    private static ErrnoException Refused(Func<Task> call) => Assert.ThrowsAsync<ErrnoException>(call).GetAwaiter().GetResult();

    [Fact]
    public void IommuFault_Count2_NextTwoMappedAccessesFaultUnmappedWritingNothing()
    {
        var fault = Inject(new FaultSettings(FaultKind.IommuFault) { Count = 2 });

        var first = _edu.DmaWrite(Iova, [7]);
        var second = _edu.DmaRead(Iova, new byte[1]);
        var third = Write(9);

        Assert.Equal((false, FaultReason.Unmapped, DmaAccess.Write, Iova), (first.Ok, first.Reason, first.Access, first.FaultIova));
        Assert.Equal((false, FaultReason.Unmapped, DmaAccess.Read), (second.Ok, second.Reason, second.Access));
        Assert.True(third);
        Assert.Equal([9], Memory());
        Assert.Equal(2, _rig.DrainEvents().OfType<FaultEvent>().Count(f => f.Reason == FaultReason.Unmapped && f.Address == Edu));
        Assert.Equal((2L, true), (fault.Fired, fault.Spent));
    }

    [Fact]
    public void IommuFault_EduDma_FaultsAndStillEnds()
    {
        Inject(new FaultSettings(FaultKind.IommuFault) { Count = 1 });

        Assert.True(StartEduDma(irq: true).Ok);

        Assert.Equal(0ul, _edu.MmioRead(0, EduDevice.RegDmaCommand, 8) & EduDevice.DmaCommandStart);
        Assert.Equal(0, DeviceBuffer);
        var events = _rig.DrainEvents();
        Assert.Contains(new FaultEvent(Edu, Iova, DmaAccess.Read, FaultReason.Unmapped), events);
        Assert.Contains(new InterruptEvent(_edu.Id, 0), events);
    }

    [Fact]
    public void DeviceError_EduDma_EndsWithErrorMovingNothing()
    {
        var fault = Inject(new FaultSettings(FaultKind.DeviceError) { Count = 1 });

        var failed = StartEduDma(irq: true);
        var bufferAfterFailure = DeviceBuffer;
        var next = StartEduDma();

        Assert.Contains("device error injected", failed.Error);
        Assert.Equal(0, bufferAfterFailure);
        Assert.DoesNotContain(_rig.DrainEvents(), e => e is InterruptEvent);
        Assert.True(next.Ok);
        Assert.Equal(0x5a, DeviceBuffer);
        Assert.Equal(1L, fault.Fired);
    }

    [Fact]
    public void DropInterrupt_Count1_DropsOnlyTheNextInterrupt()
    {
        Inject(new FaultSettings(FaultKind.DropInterrupt) { Count = 1 });

        RaiseEduInterrupt();
        var afterFirst = _rig.DrainEvents();
        RaiseEduInterrupt();

        Assert.Empty(afterFirst);
        Assert.Equal(new InterruptEvent(_edu.Id, 0), Assert.Single(_rig.DrainEvents()));
    }

    [Fact]
    public void DelayInterrupt_ArrivesExactlyDelayLate_OnTheBrokerClock()
    {
        var heard = new List<uint>();
        _edu.SetInterruptListener(heard.Add);
        Inject(new FaultSettings(FaultKind.DelayInterrupt) { Count = 1, Delay = TimeSpan.FromMilliseconds(250) });

        RaiseEduInterrupt();
        Clock.Advance(TimeSpan.FromMilliseconds(249));
        var early = _rig.DrainEvents();
        Clock.Advance(TimeSpan.FromMilliseconds(1));

        Assert.Empty(early);
        Assert.Equal(new InterruptEvent(_edu.Id, 0), Assert.Single(_rig.DrainEvents()));
        Assert.Equal([0u], heard);
    }

    [Fact]
    public void DelayInterrupt_HandleClosedMeanwhile_IsDropped()
    {
        Inject(new FaultSettings(FaultKind.DelayInterrupt) { Delay = TimeSpan.FromMilliseconds(10) });
        RaiseEduInterrupt();

        Broker.Vfio.CloseDevice(_rig.Session, _edu.Id);
        Clock.Advance(TimeSpan.FromMilliseconds(10));

        Assert.Empty(_rig.DrainEvents());
    }

    [Fact]
    public void SlowReset_Flr_TakesTheDelay_ThenNoMore()
    {
        Inject(new FaultSettings(FaultKind.SlowReset) { Count = 1, Delay = TimeSpan.FromSeconds(2) });

        Assert.Equal(TimeSpan.FromSeconds(2), Broker.Vfio.ResetDevice(_rig.Session, _edu.Id));
        Assert.Equal(TimeSpan.Zero, Broker.Vfio.ResetDevice(_rig.Session, _edu.Id));
    }

    [Fact]
    public void SurpriseRemove_OwnedOpenDevice_GoesNowAndItsHandleFailsEnodev()
    {
        var group = DmaRig.EduGroups[0];
        var revision = Broker.Journal.Current.Revision;

        var fault = Inject(new FaultSettings(FaultKind.SurpriseRemove));

        var e = Assert.Throws<ErrnoException>(() => _edu.DmaWrite(Iova, [1]));
        Assert.Equal((Errno.ENODEV, ErrorKind.NotFound), (e.Errno, e.Kind));
        Assert.True(_edu.Removed.IsCancellationRequested);
        Assert.Equal(Errno.ENODEV, Assert.Throws<ErrnoException>(() => Broker.Vfio.ResetDevice(_rig.Session, _edu.Id)).Errno);
        Assert.Contains(new DeviceRemovedEvent(Edu), _rig.DrainEvents());
        Assert.Equal(Errno.ENODEV, Assert.Throws<ErrnoException>(() => Broker.Table.GetDevice(Edu)).Errno);
        Assert.False(Broker.Journal.Current.Groups.ContainsKey(group));
        Assert.False(Broker.Journal.Current.Devices.ContainsKey(Edu));
        Assert.True(Broker.Journal.Current.Revision > revision);
        Assert.Equal((1L, true), (fault.Fired, fault.Spent));
        // Closing the dead handle still works, and the session's end releases the rest.
        Broker.Vfio.CloseDevice(_rig.Session, _edu.Id);
        Assert.Equal(0, Broker.Vfio.OpenDevices);
    }

    [Fact]
    public async Task SurpriseRemove_DeviceOfASharedGroup_GroupStaysOwnedWithoutIt()
    {
        // 0000:06:00.0 and 0000:07:00.0 share a group with the switch's downstream ports.
        var addr = PciAddress.Parse("0000:06:00.0");
        var sibling = PciAddress.Parse("0000:07:00.0");
        var groupId = Broker.Table.GetDevice(addr).Group.Id;
        var session = Broker.Sessions.Open("shared");
        var container = Broker.Vfio.CreateContainer(session, ContainerType.Type1v2);
        Broker.Vfio.SetContainer(session, groupId, container.Id);

        await Broker.Faults.InjectAsync(addr, new FaultSettings(FaultKind.SurpriseRemove));

        var group = Broker.Journal.Current.Groups[groupId];
        Assert.Equal((OwnerKind.User, session.Id), (group.OwnerKind, group.OwnerSession));
        Assert.DoesNotContain(addr, group.Devices);
        Assert.Contains(sibling, group.Devices);
        Assert.Contains(new DeviceRemovedEvent(addr), DmaRig.Drain(session));
    }

    [Fact]
    public async Task LinkDown_OwnedDevice_SessionEndsAsConnectionLostAndCut()
    {
        await Broker.Faults.InjectAsync(Edu, new FaultSettings(FaultKind.LinkDown));

        Assert.Equal(SessionEndReason.ConnectionLost, _rig.Session.EndReason);
        Assert.True(_rig.Session.ConnectionCut);
        Assert.StartsWith("connection lost", _rig.Session.EndMessage);
        Assert.Equal(OwnerKind.None, Broker.Journal.Current.Groups[DmaRig.EduGroups[0]].OwnerKind);
        Assert.Null(Broker.Sessions.TryFind(_rig.Session.Id));
    }

    [Fact]
    public void LinkDown_DeviceNobodyOwns_EinvalAndNothingListed()
    {
        var e = Refused(() => Broker.Faults.InjectAsync(DmaRig.Edus[1], new FaultSettings(FaultKind.LinkDown)));

        Assert.Equal((Errno.EINVAL, ErrorKind.FailedPrecondition), (e.Errno, e.Kind));
        Assert.Empty(Broker.Faults.List());
    }

    [Fact]
    public void Count0_FiresUntilCleared_ThenNever()
    {
        var fault = Inject(new FaultSettings(FaultKind.IommuFault));
        var faulted = Enumerable.Range(0, 5).Count(i => !Write((byte)i));

        var cleared = Broker.Faults.Clear(Edu);

        Assert.Equal(5, faulted);
        Assert.Equal(1, cleared);
        Assert.True(Write(1));
        Assert.Equal((5L, false), (fault.Fired, fault.Spent));
        Assert.Empty(Broker.Faults.List());
    }

    [Fact]
    public void Clear_Everything_DisarmsEveryDevice_AndUnknownAddressIsEnodev()
    {
        Inject(new FaultSettings(FaultKind.IommuFault));
        Inject(new FaultSettings(FaultKind.DropInterrupt), DmaRig.Edus[1]);

        Assert.Equal(0, Broker.Faults.Clear(DmaRig.Edus[2]));
        Assert.Equal(2, Broker.Faults.Clear(null));
        Assert.True(Write(1));
        Assert.Equal(Errno.ENODEV, Assert.Throws<ErrnoException>(() => Broker.Faults.Clear(PciAddress.Parse("0000:5e:00.0"))).Errno);
    }

    /// <summary>The firing pattern of a probability fault over <paramref name="events"/> accesses, on a fresh broker.</summary>
    private static async Task<string> Pattern(int probability, ulong seed, int events = 200)
    {
        await using var rig = DmaRig.Create(ContainerType.Type1v2);
        var vaddr = rig.Allocate(Page).Vaddr;
        rig.Map(vaddr, Iova, Page);
        var handle = rig.Open();
        await rig.Broker.Faults.InjectAsync(Edu, new FaultSettings(FaultKind.IommuFault) { Probability = probability, Seed = seed });
        return new string([.. Enumerable.Range(0, events).Select(_ => handle.DmaWrite(Iova, [1]).Ok ? '.' : 'F')]);
    }

    [Fact]
    public async Task Probability_SameSeed_ReplaysTheSameFirings_AnotherSeedDiffers()
    {
        var first = await Pattern(30, seed: 42);
        var replay = await Pattern(30, seed: 42);
        var other = await Pattern(30, seed: 43);

        Assert.Equal(first, replay);
        Assert.NotEqual(first, other);
        // About 30% of 200, and neither never nor always: the draws are used.
        Assert.InRange(first.Count(c => c == 'F'), 30, 90);
    }

    [Fact]
    public async Task Probability_WithCount_StopsAfterCountFirings()
    {
        var pattern = await Pattern(50, seed: 7, events: 100);
        var limited = Inject(new FaultSettings(FaultKind.IommuFault) { Probability = 50, Seed = 7, Count = 3 });
        var mine = new string([.. Enumerable.Range(0, 100).Select(_ => Write(1) ? '.' : 'F')]);

        // The same draws as the unlimited fault, up to its third firing; then nothing.
        var third = pattern.Select((c, i) => (c, i)).Where(x => x.c == 'F').Skip(2).First().i;
        Assert.Equal(pattern[..(third + 1)], mine[..(third + 1)]);
        Assert.DoesNotContain('F', mine[(third + 1)..]);
        Assert.Equal((3L, true), (limited.Fired, limited.Spent));
    }

    public static TheoryData<string, FaultSettings, string> Refusals => new()
    {
        { "kind 0", new FaultSettings(0), "0000:08:00.0" },
        { "kind 99", new FaultSettings((FaultKind)99), "0000:08:00.0" },
        { "probability 101", new FaultSettings(FaultKind.IommuFault) { Probability = 101 }, "0000:08:00.0" },
        { "probability 0 in the core", new FaultSettings(FaultKind.IommuFault) { Probability = 0 }, "0000:08:00.0" },
        { "delay without the delay kinds", new FaultSettings(FaultKind.IommuFault) { Delay = TimeSpan.FromSeconds(1) }, "0000:08:00.0" },
        { "delay interrupt without delay", new FaultSettings(FaultKind.DelayInterrupt), "0000:08:00.0" },
        { "slow reset over ten minutes", new FaultSettings(FaultKind.SlowReset) { Delay = TimeSpan.FromMinutes(11) }, "0000:08:00.0" },
        { "status on edu", new FaultSettings(FaultKind.DeviceError) { Status = 0x281 }, "0000:08:00.0" },
        { "opcode on edu", new FaultSettings(FaultKind.DeviceError) { Opcode = 2 }, "0000:08:00.0" },
        { "lba range on edu", new FaultSettings(FaultKind.DeviceError) { LbaCount = 8 }, "0000:08:00.0" },
        { "opcode on an nvme iommu fault", new FaultSettings(FaultKind.IommuFault) { Opcode = 2 }, "0000:01:00.0" },
        { "opcode over 255", new FaultSettings(FaultKind.DeviceError) { Opcode = 256 }, "0000:01:00.0" },
        { "status over 15 bits", new FaultSettings(FaultKind.DeviceError) { Status = 0x8000 }, "0000:01:00.0" },
        { "lba start without count", new FaultSettings(FaultKind.DeviceError) { LbaStart = 5 }, "0000:01:00.0" },
        { "lba range wraps", new FaultSettings(FaultKind.DeviceError) { LbaStart = ulong.MaxValue, LbaCount = 2 }, "0000:01:00.0" },
        { "device error on a nic", new FaultSettings(FaultKind.DeviceError), "0000:02:00.0" },
        { "count on surprise remove", new FaultSettings(FaultKind.SurpriseRemove) { Count = 1 }, "0000:08:00.0" },
        { "probability on link down", new FaultSettings(FaultKind.LinkDown) { Probability = 50 }, "0000:08:00.0" },
    };

    [Theory]
    [MemberData(nameof(Refusals))]
    public void Inject_BadSettings_EinvalAndNothingChanges(string why, FaultSettings settings, string address)
    {
        var before = Broker.Journal.Current.Revision;

        var e = Refused(() => Broker.Faults.InjectAsync(PciAddress.Parse(address), settings));

        Assert.True(e.Errno == Errno.EINVAL, why);
        Assert.Empty(Broker.Faults.List());
        Assert.Equal(before, Broker.Journal.Current.Revision);
        Assert.True(Write(1), why);
    }

    [Fact]
    public void Inject_UnknownDevice_Enodev()
    {
        var e = Refused(() => Broker.Faults.InjectAsync(PciAddress.Parse("0000:5e:00.0"), new FaultSettings(FaultKind.IommuFault)));

        Assert.Equal((Errno.ENODEV, ErrorKind.NotFound), (e.Errno, e.Kind));
    }

    [Fact]
    public void SurpriseRemove_BridgeWithDevicesBelow_EbusyAndNothingChanges()
    {
        var before = Broker.Journal.Current.Revision;

        var e = Refused(() => Broker.Faults.InjectAsync(PciAddress.Parse("0000:00:05.0"), new FaultSettings(FaultKind.SurpriseRemove)));

        Assert.Equal(Errno.EBUSY, e.Errno);
        Assert.Equal(before, Broker.Journal.Current.Revision);
        Assert.Empty(Broker.Faults.List());
    }

    /// <summary>
    /// An edu DMA of one byte (0x5a) from host memory at <see cref="Iova"/> into the device buffer,
    /// run to its end: the command's result, and the clock moved on past the DMA's latency.
    /// </summary>
    private MmioResult StartEduDma(bool irq = false)
    {
        _rig.Session.WriteMemory(_vaddr, [0x5a]);
        Assert.True(_edu.MmioWrite(0, EduDevice.RegDmaSource, 8, Iova).Ok);
        Assert.True(_edu.MmioWrite(0, EduDevice.RegDmaDestination, 8, EduDevice.DmaStart).Ok);
        Assert.True(_edu.MmioWrite(0, EduDevice.RegDmaCount, 8, 1).Ok);
        var result = _edu.MmioWrite(0, EduDevice.RegDmaCommand, 8, EduDevice.DmaCommandStart | (irq ? EduDevice.DmaCommandIrq : 0));
        Clock.Advance(((EduDevice)_edu.Device.Model).DmaLatency);
        return result;
    }

    private byte DeviceBuffer => ((EduDevice)_edu.Device.Model).Buffer[0];

    private void RaiseEduInterrupt()
    {
        Assert.True(_edu.MmioWrite(0, EduDevice.RegIrqRaise, 4, 1).Ok);
        Assert.True(_edu.MmioWrite(0, EduDevice.RegIrqAck, 4, 1).Ok);
    }
}

/// <summary>Fault injection at the NVMe model's hook points (docs/nvme.md), driven by <see cref="NvmeTestDriver"/>.</summary>
public sealed class NvmeFaultInjectionTests : IAsyncLifetime
{
    private const int IoSq = 2;
    private const int IoCq = 3;
    private const int Data = 4;

    private readonly FakeTimeProvider _time = new();
    private readonly NvmeTestDriver _d;

    public NvmeFaultInjectionTests() => _d = NvmeTestDriver.Create(broker: new Broker(TopologyDocument.Default(), time: _time));

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync() => await _d.DisposeAsync();

    private Task<InjectedFault> Inject(FaultSettings settings) => _d.Broker.Faults.InjectAsync(NvmeTestDriver.Address, settings);

    private NvmeStatus Io(NvmeQueue io, byte opcode, ushort cid, ulong lba, int blocks = 1)
    {
        _d.Submit(io, NvmeTestDriver.ReadWrite(opcode, cid, lba, blocks, NvmeTestDriver.Iova(Data)));
        _d.Ring(io);
        return Assert.Single(_d.Reap(io)).Status;
    }

    [Fact]
    public async Task DeviceError_OpcodeAndLbaRange_FailOnlyMatchingReadsWithTheStatus()
    {
        _d.Enable();
        var io = _d.CreateIoQueuePair(1, IoSq, IoCq, entries: 16, vector: 1);
        var fault = await Inject(new FaultSettings(FaultKind.DeviceError) { Opcode = NvmeController.IoRead, LbaStart = 100, LbaCount = 10, Status = 0x0281 });

        var statuses = new[]
        {
            Io(io, NvmeController.IoRead, 1, lba: 109),            // last LBA of the range
            Io(io, NvmeController.IoRead, 2, lba: 96, blocks: 4),  // ends just before it
            Io(io, NvmeController.IoRead, 3, lba: 96, blocks: 5),  // overlaps its first LBA
            Io(io, NvmeController.IoWrite, 4, lba: 105),           // another opcode
            Io(io, NvmeController.IoRead, 5, lba: 110),            // just after it
        };

        Assert.Equal([(NvmeStatus)0x0281, NvmeStatus.Success, (NvmeStatus)0x0281, NvmeStatus.Success, NvmeStatus.Success], statuses);
        Assert.Equal(2L, fault.Fired);
    }

    [Fact]
    public async Task DeviceError_NoFilter_CompletesTheNextCommandWithDataTransferError()
    {
        _d.Enable();
        var fault = await Inject(new FaultSettings(FaultKind.DeviceError) { Count = 1 });

        var identify = _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminIdentify, 9, nsid: 0, prp1: NvmeTestDriver.Iova(Data), cdw10: NvmeController.CnsController));
        var again = _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminIdentify, 10, nsid: 0, prp1: NvmeTestDriver.Iova(Data), cdw10: NvmeController.CnsController));

        Assert.Equal((NvmeStatus.DataTransferError, NvmeStatus.Success), (identify.Status, again.Status));
        Assert.Equal((uint)NvmeStatus.DataTransferError, fault.Settings.Status);
    }

    [Fact]
    public async Task SlowReset_Enable_CstsRdyRisesOnlyAfterTheDelay()
    {
        await Inject(new FaultSettings(FaultKind.SlowReset) { Count = 1, Delay = TimeSpan.FromMilliseconds(500) });

        _d.Enable();
        var before = _d.Csts & NvmeController.CstsReady;
        _time.Advance(TimeSpan.FromMilliseconds(499));
        var almost = _d.Csts & NvmeController.CstsReady;
        _time.Advance(TimeSpan.FromMilliseconds(1));

        Assert.Equal((0u, 0u, NvmeController.CstsReady), (before, almost, _d.Csts & NvmeController.CstsReady));
        // Ready now, the controller runs commands; the next enable is prompt again (count 1).
        Assert.Equal(NvmeStatus.Success, _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminIdentify, 1, prp1: NvmeTestDriver.Iova(Data), cdw10: NvmeController.CnsController)).Status);
        _d.Write32(NvmeController.RegCc, 0);
        _d.Enable();
        Assert.Equal(NvmeController.CstsReady, _d.Csts & NvmeController.CstsReady);
    }

    [Fact]
    public async Task IommuFault_CommandFetch_SetsCfsAndPostsTheFault()
    {
        _d.Enable();
        var io = _d.CreateIoQueuePair(1, IoSq, IoCq, entries: 16, vector: 1);
        _d.DrainEvents();
        await Inject(new FaultSettings(FaultKind.IommuFault) { Count = 1 });

        // The fault takes the command fetch: the controller cannot report it in a completion, so CFS.
        _d.Submit(io, NvmeTestDriver.ReadWrite(NvmeController.IoWrite, 1, 0, 1, NvmeTestDriver.Iova(Data)));
        _d.Ring(io);

        Assert.Equal(NvmeController.CstsFatal, _d.Csts & NvmeController.CstsFatal);
        Assert.Contains(_d.DrainEvents(), e => e is FaultEvent { Reason: FaultReason.Unmapped });
    }
}
