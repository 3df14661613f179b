using System.Buffers.Binary;
using DmaBroker.Core.Devices;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Memory;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Core.Tests;

/// <summary>
/// The edu model as QEMU's docs/specs/edu.rst and hw/misc/edu.c define it (SPEC §6), driven the way
/// a userspace driver drives it: register accesses through an open device handle, DMA through the
/// IOMMU mappings of the session's container, interrupts on the session's event stream.
/// </summary>
public sealed class EduDeviceTests : IAsyncLifetime, IAsyncDisposable
{
    private const ulong Page = DmaRig.Page;
    private const ulong SourceIova = 0x10000;
    private const ulong DestinationIova = 0x20000;
    private const ulong Buffer = EduDevice.DmaStart;

    private readonly DmaRig _rig = DmaRig.Create(ContainerType.Type1v2);
    private readonly DeviceHandle _edu;
    private readonly MemoryBlock _source;
    private readonly MemoryBlock _destination;
    private readonly byte[] _pattern = [.. Enumerable.Range(0, 256).Select(i => (byte)(255 - i))];

    public EduDeviceTests()
    {
        _source = _rig.Allocate(Page);
        _destination = _rig.Allocate(Page);
        _rig.Session.WriteMemory(_source.Vaddr, _pattern);
        _rig.Map(_source.Vaddr, SourceIova, Page, read: true, write: false);
        _rig.Map(_destination.Vaddr, DestinationIova, Page, read: false, write: true);
        _edu = _rig.Open();
    }

    public Task InitializeAsync() => Task.CompletedTask;

    Task IAsyncLifetime.DisposeAsync() => DisposeAsync().AsTask();

    public ValueTask DisposeAsync() => _rig.DisposeAsync();

    private EduDevice Model => (EduDevice)_edu.Device.Model;

    private ulong Read(ulong offset, int width = 4) => _edu.MmioRead(0, offset, (uint)width);

    private void Write(ulong offset, ulong value, int width = 4) => Assert.True(_edu.MmioWrite(0, offset, (uint)width, value).Ok);

    private MmioResult StartDma(ulong source, ulong destination, ulong count, ulong command)
    {
        Write(EduDevice.RegDmaSource, source, 8);
        Write(EduDevice.RegDmaDestination, destination, 8);
        Write(EduDevice.RegDmaCount, count, 8);
        return _edu.MmioWrite(0, EduDevice.RegDmaCommand, 8, command);
    }

    /// <summary>Starts a DMA and lets the device's timer run it to the end.</summary>
    private void RunDma(ulong source, ulong destination, ulong count, ulong command)
    {
        var started = StartDma(source, destination, count, command);
        Assert.True(started.Ok, started.ToString());
        Assert.Equal(1ul, Running());
        _rig.Clock.Advance(Model.DmaLatency);
        Assert.Equal(0ul, Running());
    }

    /// <summary>The DMA command's start bit: 1 while a transfer is in flight.</summary>
    private ulong Running() => Read(EduDevice.RegDmaCommand, 8) & EduDevice.DmaCommandStart;

    [Fact]
    public void ConfigSpace_Open_ShowsEduIdsAndBusMaster()
    {
        var config = _edu.RegionRead(DeviceModel.ConfigIndex, 0, 8);

        Assert.Equal(0x1234, BinaryPrimitives.ReadUInt16LittleEndian(config));
        Assert.Equal(0x11e8, BinaryPrimitives.ReadUInt16LittleEndian(config.AsSpan(2)));
        Assert.Equal(DeviceModel.CommandBusMaster, BinaryPrimitives.ReadUInt16LittleEndian(config.AsSpan(4)) & DeviceModel.CommandBusMaster);
        Assert.Equal(EduDevice.Bar0Size, Model.RegionSize(0));
    }

    [Fact]
    public void MmioRead_Identification_Is010000ed() => Assert.Equal(0x010000edul, Read(EduDevice.RegId));

    [Theory]
    [InlineData(0x0ul, 0xffff_fffful)]
    [InlineData(0x1234_5678ul, 0xedcb_a987ul)]
    [InlineData(0xffff_fffful, 0x0ul)]
    [InlineData(0xa5a5_a5a5ul, 0x5a5a_5a5aul)]
    public void Liveness_Written_ReadsBackItsInverse(ulong value, ulong inverse)
    {
        Write(EduDevice.RegLiveness, value);

        Assert.Equal(inverse, Read(EduDevice.RegLiveness));
    }

    [Theory]
    [InlineData(0u, 1u)]
    [InlineData(1u, 1u)]
    [InlineData(5u, 120u)]
    [InlineData(10u, 3_628_800u)]
    [InlineData(12u, 479_001_600u)]
    [InlineData(13u, 1_932_053_504u)] // 13! mod 2^32, as QEMU's 32-bit arithmetic gives
    [InlineData(33u, 2_147_483_648u)] // 33! mod 2^32 = 2^31
    [InlineData(34u, 0u)]             // 34! holds 2^32: 0 from here on
    [InlineData(0xffff_ffffu, 0u)]    // answered without looping four billion times under the device lock
    public void Factorial_Written_ReadsBackTheFactorialAndIsNotComputingAfterwards(uint n, uint factorial)
    {
        Write(EduDevice.RegFactorial, n);

        Assert.Equal(factorial, Read(EduDevice.RegFactorial));
        Assert.Equal(0ul, Read(EduDevice.RegStatus) & EduDevice.StatusComputing);
        Assert.Empty(_rig.DrainEvents());
    }

    [Fact]
    public void Factorial_WithStatusIrqBitSet_RaisesInterrupt1()
    {
        Write(EduDevice.RegStatus, EduDevice.StatusIrqFactorial);
        Assert.Equal(EduDevice.StatusIrqFactorial, Read(EduDevice.RegStatus));
        Assert.Empty(_rig.DrainEvents());

        Write(EduDevice.RegFactorial, 4);

        Assert.Equal(24ul, Read(EduDevice.RegFactorial));
        Assert.Equal(EduDevice.FactorialIrq, Read(EduDevice.RegIrqStatus));
        Assert.Equal([new InterruptEvent(_edu.Id, 0)], _rig.DrainEvents());
        // Clearing the status bit stops the interrupts; acknowledging clears the status.
        Write(EduDevice.RegStatus, 0);
        Write(EduDevice.RegIrqAck, EduDevice.FactorialIrq);
        Write(EduDevice.RegFactorial, 3);
        Assert.Equal((6ul, 0ul, 0ul), (Read(EduDevice.RegFactorial), Read(EduDevice.RegIrqStatus), Read(EduDevice.RegStatus)));
        Assert.Empty(_rig.DrainEvents());
    }

    [Fact]
    public void IrqRaiseAndAck_Bits_AccumulateInStatusAndEachRaiseInterrupts()
    {
        Write(EduDevice.RegIrqRaise, 0x5);
        Write(EduDevice.RegIrqRaise, 0x100);
        Assert.Equal(0x105ul, Read(EduDevice.RegIrqStatus));
        Assert.Equal([new InterruptEvent(_edu.Id, 0), new InterruptEvent(_edu.Id, 0)], _rig.DrainEvents());

        Write(EduDevice.RegIrqAck, 0x4);
        Assert.Equal(0x101ul, Read(EduDevice.RegIrqStatus));
        Write(EduDevice.RegIrqAck, 0xffff_ffff);
        Assert.Equal(0ul, Read(EduDevice.RegIrqStatus));
        Assert.Empty(_rig.DrainEvents());
    }

    [Fact]
    public void IrqRaise_ListenerSet_AlsoToldTheVector()
    {
        var vectors = new List<uint>();
        _edu.SetInterruptListener(vectors.Add);

        Write(EduDevice.RegIrqRaise, 0x8);
        _edu.SetInterruptListener(null);
        Write(EduDevice.RegIrqRaise, 0x8);

        Assert.Equal([0u], vectors);
    }

    /// <summary>The driver's DMA sequence from edu.rst: RAM to the device buffer, then the buffer back to RAM with the DMA interrupt.</summary>
    [Fact]
    public void Dma_RamToDeviceThenDeviceToRam_CopiesThroughTheIommuAndRaisesInterrupt100()
    {
        RunDma(SourceIova, Buffer + 0x100, 256, EduDevice.DmaCommandStart);

        Assert.Equal(_pattern, Model.Buffer.Slice(0x100, 256).ToArray());
        Assert.Empty(_rig.DrainEvents()); // no interrupt asked for

        RunDma(Buffer + 0x100, DestinationIova + 0x80, 256, EduDevice.DmaCommandStart | EduDevice.DmaCommandToRam | EduDevice.DmaCommandIrq);

        var landed = new byte[256];
        _rig.Session.ReadMemory(_destination.Vaddr + 0x80, landed);
        Assert.Equal(_pattern, landed);
        Assert.Equal(EduDevice.DmaIrq, Read(EduDevice.RegIrqStatus));
        Assert.Equal([new InterruptEvent(_edu.Id, 0)], _rig.DrainEvents());
    }

    /// <summary>As QEMU's dma_timer: the start bit reads set, and nothing moves or interrupts, until the device's latency has passed.</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Dma_UntilItsLatencyPasses_StartBitReadsSetAndNothingMovesOrInterrupts(bool toRam)
    {
        var command = EduDevice.DmaCommandStart | EduDevice.DmaCommandIrq | (toRam ? EduDevice.DmaCommandToRam : 0);
        if (toRam)
            RunDma(SourceIova, Buffer, 256, EduDevice.DmaCommandStart);
        var memory = HostMemory();

        Assert.True((toRam ? StartDma(Buffer, DestinationIova, 256, command) : StartDma(SourceIova, Buffer, 256, command)).Ok);
        _rig.Clock.Advance(Model.DmaLatency - TimeSpan.FromTicks(1));

        Assert.Equal(command, Read(EduDevice.RegDmaCommand, 8));
        Assert.Equal(memory, HostMemory());
        Assert.Equal(toRam ? _pattern : new byte[256], Model.Buffer[..256].ToArray());
        Assert.Equal(0ul, Read(EduDevice.RegIrqStatus));
        Assert.Empty(_rig.DrainEvents());

        _rig.Clock.Advance(TimeSpan.FromTicks(1));

        Assert.Equal(command & ~EduDevice.DmaCommandStart, Read(EduDevice.RegDmaCommand, 8));
        Assert.Equal(_pattern, Model.Buffer[..256].ToArray());
        if (toRam)
            Assert.Equal(_pattern, DmaRig.Contents(_destination)[..256]);
        Assert.Equal(EduDevice.DmaIrq, Read(EduDevice.RegIrqStatus));
        Assert.Equal([new InterruptEvent(_edu.Id, 0)], _rig.DrainEvents());
    }

    /// <summary>QEMU's dma_rw: while a DMA runs, its registers and the command ignore writes, and the timer keeps its time.</summary>
    [Fact]
    public void Dma_StartedAgainWhileRunning_IsIgnored()
    {
        Assert.True(StartDma(SourceIova, Buffer, 64, EduDevice.DmaCommandStart).Ok);
        var half = Model.DmaLatency / 2;
        _rig.Clock.Advance(half);

        var again = StartDma(Buffer, DestinationIova, 128, EduDevice.DmaCommandStart | EduDevice.DmaCommandToRam | EduDevice.DmaCommandIrq);
        Assert.True(again.Ok);
        Assert.Equal((SourceIova, Buffer, 64ul, EduDevice.DmaCommandStart),
            (Read(EduDevice.RegDmaSource, 8), Read(EduDevice.RegDmaDestination, 8), Read(EduDevice.RegDmaCount, 8), Read(EduDevice.RegDmaCommand, 8)));
        _rig.Clock.Advance(Model.DmaLatency - half);

        Assert.Equal(0ul, Running());
        Assert.Equal(_pattern[..64], Model.Buffer[..64].ToArray());
        Assert.All(Model.Buffer[64..].ToArray(), b => Assert.Equal(0, b));
        Assert.All(DmaRig.Contents(_destination), b => Assert.Equal(0, b));
        _rig.Clock.Advance(Model.DmaLatency);
        Assert.Equal(0ul, Read(EduDevice.RegIrqStatus));
        Assert.Empty(_rig.DrainEvents());
    }

    /// <summary>
    /// Whatever takes the device from its transfer drops a DMA in flight: a reset (FLR), closing the
    /// handle, the session ending. Its timer still fires, but nothing lands and no interrupt follows.
    /// </summary>
    [Theory]
    [InlineData("reset")]
    [InlineData("close")]
    [InlineData("session end")]
    public async Task Dma_TakenAwayInFlight_NothingLandsAndNoInterruptFollows(string by)
    {
        RunDma(SourceIova, Buffer, 64, EduDevice.DmaCommandStart);
        Assert.True(StartDma(Buffer, DestinationIova, 64, EduDevice.DmaCommandStart | EduDevice.DmaCommandToRam | EduDevice.DmaCommandIrq).Ok);

        if (by == "reset")
            _rig.Vfio.ResetDevice(_rig.Session, _edu.Id);
        else if (by == "close")
            _rig.Vfio.CloseDevice(_rig.Session, _edu.Id);
        else
            await _rig.Broker.Sessions.EndAsync(_rig.Session, SessionEndReason.ConnectionLost).WaitAsync(CoreState.Timeout);
        _rig.Clock.Advance(Model.DmaLatency);

        Assert.All(DmaRig.Contents(_destination), b => Assert.Equal(0, b));
        Assert.DoesNotContain(_rig.DrainEvents(), e => e is InterruptEvent or FaultEvent);
        if (by == "reset")
        {
            AssertReset(_edu);
            DmaRig.SetBusMaster(_edu, on: true);
            AssertStillWorks();
        }
        else if (by == "close")
        {
            AssertReset(_rig.Vfio.OpenDevice(_rig.Session, _edu.Device.Address));
        }
    }

    [Theory]
    [InlineData(0x1000_0000ul)] // bit 28: just above the mask
    [InlineData(0xf000_0000ul)]
    [InlineData(0xffff_ffff_f000_0000ul)]
    public void Dma_AddressAboveThe28BitMask_IsClampedToIt(ulong highBits)
    {
        RunDma(SourceIova | highBits, Buffer, 64, EduDevice.DmaCommandStart);
        RunDma(Buffer, DestinationIova | highBits, 64, EduDevice.DmaCommandStart | EduDevice.DmaCommandToRam);

        var landed = new byte[64];
        _rig.Session.ReadMemory(_destination.Vaddr, landed);
        Assert.Equal(_pattern[..64], landed);
    }

    /// <summary>As in QEMU, a DMA the bus refuses still ends: the start bit clears and the completion interrupt comes if asked for.</summary>
    [Fact]
    public void Dma_BusMasterOff_FaultsMovesNothingAndStillEndsWithItsInterrupt()
    {
        DmaRig.SetBusMaster(_edu, on: false);

        RunDma(SourceIova, Buffer, 64, EduDevice.DmaCommandStart | EduDevice.DmaCommandIrq);

        Assert.All(Model.Buffer.ToArray(), b => Assert.Equal(0, b));
        Assert.Equal([new FaultEvent(_edu.Device.Address, SourceIova, DmaAccess.Read, FaultReason.BusMasterOff), new InterruptEvent(_edu.Id, 0)], _rig.DrainEvents());
        Assert.Equal(EduDevice.DmaIrq, Read(EduDevice.RegIrqStatus));
    }

    [Theory]
    [InlineData(0x30000ul, false, FaultReason.Unmapped)] // RAM to device from an unmapped IOVA
    [InlineData(DestinationIova, false, FaultReason.Permission)] // reading a WRITE-only mapping
    [InlineData(0x30000ul, true, FaultReason.Unmapped)] // device to RAM into an unmapped IOVA
    [InlineData(SourceIova, true, FaultReason.Permission)] // writing a READ-only mapping
    public void Dma_IommuRefuses_FaultsEndsWithItsInterruptAndTheDeviceKeepsWorking(ulong iova, bool toRam, FaultReason reason)
    {
        var before = HostMemory();
        var command = EduDevice.DmaCommandStart | EduDevice.DmaCommandIrq | (toRam ? EduDevice.DmaCommandToRam : 0);

        if (toRam)
            RunDma(Buffer, iova + 8, 64, command);
        else
            RunDma(iova + 8, Buffer, 64, command);

        var access = toRam ? DmaAccess.Write : DmaAccess.Read;
        Assert.Equal([new FaultEvent(_edu.Device.Address, iova, access, reason), new InterruptEvent(_edu.Id, 0)], _rig.DrainEvents());
        Assert.Equal(before, HostMemory());
        Assert.Equal(EduDevice.DmaIrq, Read(EduDevice.RegIrqStatus));
        Write(EduDevice.RegIrqAck, EduDevice.DmaIrq);
        AssertStillWorks();
    }

    /// <summary>QEMU aborts on these (edu_check_range); the broker fails the DMA with an error and carries on.</summary>
    [Theory]
    [InlineData(EduDevice.DmaStart - 16, 16ul)] // below the buffer
    [InlineData(EduDevice.DmaStart - 8, 16ul)] // straddles its start
    [InlineData(EduDevice.DmaStart + 4096 - 8, 16ul)] // straddles its end
    [InlineData(EduDevice.DmaStart + 4096, 1ul)] // right after it
    [InlineData(EduDevice.DmaStart, 4097ul)] // one byte too many
    [InlineData(EduDevice.DmaStart + 8, ulong.MaxValue - 7)] // end wraps around to inside the buffer
    [InlineData(0xffff_ffff_ffff_fff8ul, 16ul)] // address wraps around
    [InlineData(0ul, 0x40010ul)]
    public void Dma_RangeOutsideTheDeviceBuffer_FailsWithAnErrorAndTheDeviceKeepsWorking(ulong deviceAddress, ulong count)
    {
        var before = HostMemory();

        foreach (var toRam in new[] { false, true })
        {
            var command = EduDevice.DmaCommandStart | EduDevice.DmaCommandIrq | (toRam ? EduDevice.DmaCommandToRam : 0);
            var result = toRam ? StartDma(deviceAddress, DestinationIova, count, command) : StartDma(SourceIova, deviceAddress, count, command);

            Assert.False(result.Ok);
            Assert.False(string.IsNullOrEmpty(result.Error));
            Assert.True(result.Dma.Ok); // not an IOMMU fault: the device refused
            Assert.Equal(0ul, Running());
            _rig.Clock.Advance(Model.DmaLatency); // never started, so nothing is left to run
        }

        Assert.Equal(before, HostMemory());
        Assert.All(Model.Buffer.ToArray(), b => Assert.Equal(0, b));
        Assert.Empty(_rig.DrainEvents());
        AssertStillWorks();
    }

    [Fact]
    public void Dma_WholeBufferBothWays_MovesExactly4096Bytes()
    {
        var big = _rig.Allocate(2 * Page);
        var data = Enumerable.Range(0, (int)(2 * Page)).Select(i => (byte)(i * 31 + 7)).ToArray();
        _rig.Session.WriteMemory(big.Vaddr, data);
        _rig.Map(big.Vaddr, 0x40000, 2 * Page);

        RunDma(0x40000 + 0x800, Buffer, 4096, EduDevice.DmaCommandStart);
        RunDma(Buffer, 0x40000, 4096, EduDevice.DmaCommandStart | EduDevice.DmaCommandToRam);

        var back = new byte[2 * Page];
        _rig.Session.ReadMemory(big.Vaddr, back);
        Assert.Equal(data.AsSpan(0x800, 4096).ToArray(), back[..4096]);
        Assert.Equal(data[4096..], back[4096..]);
    }

    [Fact]
    public void ResetDevice_AfterUse_ClearsRegistersBufferAndBusMaster()
    {
        Write(EduDevice.RegLiveness, 0x1234);
        Write(EduDevice.RegStatus, EduDevice.StatusIrqFactorial);
        Write(EduDevice.RegFactorial, 5);
        Write(EduDevice.RegIrqRaise, 0x30);
        RunDma(SourceIova, Buffer, 64, EduDevice.DmaCommandStart);
        Write(EduDevice.RegDmaCount, 7, 8);

        _rig.Vfio.ResetDevice(_rig.Session, _edu.Id);

        AssertReset(_edu);
        Assert.Equal(0x010000edul, Read(EduDevice.RegId));
        var config = _edu.RegionRead(DeviceModel.ConfigIndex, 0, 4);
        Assert.Equal([0x34, 0x12, 0xe8, 0x11], config);
        // Without Bus Master the device may not DMA until the driver enables it again.
        _rig.DrainEvents();
        RunDma(SourceIova, Buffer, 64, EduDevice.DmaCommandStart);
        Assert.Equal(FaultReason.BusMasterOff, Assert.IsType<FaultEvent>(Assert.Single(_rig.DrainEvents())).Reason);
        DmaRig.SetBusMaster(_edu, on: true);
        RunDma(SourceIova, Buffer, 64, EduDevice.DmaCommandStart);
        Assert.Empty(_rig.DrainEvents());
        Assert.Equal(_pattern[..64], Model.Buffer[..64].ToArray());
    }

    /// <summary>
    /// Every edu register reads zero (the liveness register is stored inverted, as QEMU's addr4 is,
    /// so a cleared one reads 0), Bus Master is off and the DMA buffer is empty.
    /// </summary>
    internal static void AssertReset(DeviceHandle edu)
    {
        ulong[] registers = [EduDevice.RegLiveness, EduDevice.RegFactorial, EduDevice.RegStatus, EduDevice.RegIrqStatus];
        foreach (var r in registers)
            Assert.True(edu.MmioRead(0, r, 4) == 0, $"register 0x{r:x} reads 0x{edu.MmioRead(0, r, 4):x} after reset");
        ulong[] dma = [EduDevice.RegDmaSource, EduDevice.RegDmaDestination, EduDevice.RegDmaCount, EduDevice.RegDmaCommand];
        foreach (var r in dma)
            Assert.True(edu.MmioRead(0, r, 8) == 0, $"register 0x{r:x} reads 0x{edu.MmioRead(0, r, 8):x} after reset");
        Assert.Equal(0ul, edu.MmioRead(DeviceModel.ConfigIndex, 4, 2));
        Assert.False(edu.Device.Model.BusMaster);
        Assert.All(((EduDevice)edu.Device.Model).Buffer.ToArray(), b => Assert.Equal(0, b));
    }

    [Theory]
    [InlineData(EduDevice.RegId, 1)]
    [InlineData(EduDevice.RegId, 2)]
    [InlineData(EduDevice.RegId, 8)] // registers below 0x80 are 32-bit only
    [InlineData(EduDevice.RegFactorial, 8)]
    [InlineData(EduDevice.RegDmaSource, 1)] // the DMA registers take 4 or 8
    [InlineData(EduDevice.RegDmaCount, 2)]
    [InlineData(0x30ul, 4)] // no register there
    [InlineData(0x1000ul, 8)]
    public void MmioRead_WrongWidthOrNoRegister_ReturnsAllOnesOfTheAccessWidth(ulong offset, int width) =>
        Assert.Equal(width == 8 ? ulong.MaxValue : (1UL << (8 * width)) - 1, Read(offset, width));

    [Theory]
    [InlineData(EduDevice.RegLiveness, 2)]
    [InlineData(EduDevice.RegLiveness, 8)]
    [InlineData(EduDevice.RegFactorial, 1)]
    [InlineData(EduDevice.RegIrqRaise, 8)]
    [InlineData(EduDevice.RegDmaSource, 2)]
    [InlineData(EduDevice.RegDmaCommand, 1)]
    public void MmioWrite_WrongWidth_IsIgnored(ulong offset, int width)
    {
        Write(EduDevice.RegLiveness, 0x55);
        Write(EduDevice.RegFactorial, 3);
        Write(EduDevice.RegDmaSource, SourceIova, 8);

        Write(offset, 0x4, width);

        Assert.Equal((~0x55ul & 0xffff_ffff, 6ul, 0ul, SourceIova), (Read(EduDevice.RegLiveness), Read(EduDevice.RegFactorial), Read(EduDevice.RegIrqStatus), Read(EduDevice.RegDmaSource, 8)));
        Assert.Equal(0ul, Read(EduDevice.RegDmaCommand, 8));
        Assert.Empty(_rig.DrainEvents());
    }

    [Fact]
    public void MmioRead_DmaRegisterAs32Bits_ReturnsItsLow32Bits()
    {
        Write(EduDevice.RegDmaSource, 0x1234_5678_9abc_d000, 8);

        Assert.Equal(0x1234_5678_9abc_d000ul, Read(EduDevice.RegDmaSource, 8));
        Assert.Equal(0x9abc_d000ul, Read(EduDevice.RegDmaSource, 4));
    }

    [Fact]
    public void MmioWrite_DmaRegisterAs32Bits_TakesOnlyThe32BitsWritten()
    {
        Write(EduDevice.RegDmaDestination, 0xffff_ffff_0000_1000, 4);

        Assert.Equal(0x1000ul, Read(EduDevice.RegDmaDestination, 8));
    }

    [Theory]
    [InlineData(1u)]
    [InlineData(5u)]
    [InlineData(6u)]
    public void MmioAccess_BarTheEduDoesNotHave_FailsEinval(uint bar)
    {
        Assert.Equal(Errno.EINVAL, Assert.Throws<ErrnoException>(() => _edu.MmioRead(bar, 0, 4)).Errno);
        Assert.Equal(Errno.EINVAL, Assert.Throws<ErrnoException>(() => _edu.MmioWrite(bar, 0, 4, 0)).Errno);
    }

    private byte[] HostMemory() => [.. DmaRig.Contents(_source), .. DmaRig.Contents(_destination)];

    private void AssertStillWorks()
    {
        Write(EduDevice.RegLiveness, 0x0f0f_0f0f);
        Assert.Equal(0xf0f0_f0f0ul, Read(EduDevice.RegLiveness));
        RunDma(SourceIova, Buffer, 32, EduDevice.DmaCommandStart);
        RunDma(Buffer, DestinationIova, 32, EduDevice.DmaCommandStart | EduDevice.DmaCommandToRam | EduDevice.DmaCommandIrq);
        var landed = new byte[32];
        _rig.Session.ReadMemory(_destination.Vaddr, landed);
        Assert.Equal(_pattern[..32], landed);
        Assert.Equal([new InterruptEvent(_edu.Id, 0)], _rig.DrainEvents());
    }
}
