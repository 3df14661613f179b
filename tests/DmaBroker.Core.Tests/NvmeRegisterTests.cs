using System.Globalization;
using DmaBroker.Core.Devices;

namespace DmaBroker.Core.Tests;

/// <summary>
/// BAR0 of the NVMe model as SPEC §14 lists it (NVMe 1.4 §3.1): reset values, what is read-only,
/// read-write and set/clear-by-one, the CC.EN / CSTS.RDY handshake, CSTS.CFS on bad CC and AQA
/// values, and the shutdown notification.
/// </summary>
public sealed class NvmeRegisterTests : IAsyncLifetime
{
    private readonly NvmeTestDriver _d = NvmeTestDriver.Create(pages: 4);

    public Task InitializeAsync() => Task.CompletedTask;

    public Task DisposeAsync() => _d.DisposeAsync().AsTask();

    public static TheoryData<string, ulong, int, ulong> ResetValues => new()
    {
        // MQES 3FFh, CQR, TO 0Fh; CSS bit 37 (NVM); DSTRD, MPSMIN and MPSMAX 0.
        { "CAP", 0x00, 8, 0x0000_0020_0f01_03ff },
        { "CAP low dword", 0x00, 4, 0x0f01_03ff },
        { "CAP high dword", 0x04, 4, 0x0000_0020 },
        { "VS 1.4", 0x08, 4, 0x0001_0400 },
        { "INTMS", 0x0c, 4, 0 },
        { "INTMC", 0x10, 4, 0 },
        { "CC", 0x14, 4, 0 },
        { "CSTS", 0x1c, 4, 0 },
        { "NSSR", 0x20, 4, 0 },
        { "AQA", 0x24, 4, 0 },
        { "ASQ", 0x28, 8, 0 },
        { "ACQ", 0x30, 8, 0 },
        { "SQ0TDBL reads 0", 0x1000, 4, 0 },
        { "CQ0HDBL reads 0", 0x1004, 4, 0 },
        { "last dword of BAR0", 0x3ffc, 4, 0 },
    };

    [Theory]
    [MemberData(nameof(ResetValues))]
    public void Register_AfterReset_ReadsItsResetValue(string register, ulong offset, int width, ulong expected)
    {
        Assert.True(expected == _d.Handle.MmioRead(0, offset, (uint)width), register);
        // A function-level reset brings back the same values after the driver changed them.
        _d.Write32(NvmeController.RegAqa, 0x0003_0003);
        _d.Write64(NvmeController.RegAsq, NvmeTestDriver.Iova(0));
        _d.Write64(NvmeController.RegAcq, NvmeTestDriver.Iova(1));
        _d.Write32(NvmeController.RegIntms, 0xff);
        _d.Write32(NvmeController.RegCc, NvmeTestDriver.EnableCc);
        _d.Broker.Vfio.ResetDevice(_d.Session, _d.Handle.Id);
        DmaRig.SetBusMaster(_d.Handle, on: true);

        Assert.True(expected == _d.Handle.MmioRead(0, offset, (uint)width), register + " after FLR");
    }

    [Fact]
    public void Cap_Fields_AreSpec14sValues()
    {
        var cap = _d.Read64(NvmeController.RegCap);

        Assert.Equal(1023ul, cap & 0xffff);                  // MQES
        Assert.Equal(1ul, (cap >> 16) & 1);                   // CQR
        Assert.NotEqual(0ul, (cap >> 24) & 0xff);             // TO
        Assert.Equal(0ul, (cap >> 32) & 0xf);                 // DSTRD
        Assert.Equal(1ul, (cap >> 37) & 0xff);                // CSS: NVM command set only
        Assert.Equal((0ul, 0ul), ((cap >> 48) & 0xf, (cap >> 52) & 0xf)); // MPSMIN = MPSMAX = 4 KiB
    }

    /// <summary>Writes are "offset:width:value" in hex, applied in order; then one read.</summary>
    [Theory]
    [InlineData("CAP is read-only", "0:8:ffffffffffffffff", 0x00, 8, 0x0000_0020_0f01_03fful)]
    [InlineData("VS is read-only", "8:4:0", 0x08, 4, 0x0001_0400ul)]
    [InlineData("CSTS is read-only", "1c:4:ffffffff", 0x1c, 4, 0ul)]
    [InlineData("INTMS sets mask bits by one", "c:4:5 c:4:10", 0x0c, 4, 0x15ul)]
    [InlineData("INTMC reads the mask", "c:4:5", 0x10, 4, 0x5ul)]
    [InlineData("INTMC clears mask bits by one", "c:4:7 10:4:5", 0x0c, 4, 0x2ul)]
    [InlineData("CC keeps its fields, reserved bits read 0", "14:4:ff003ffe", 0x14, 4, 0x0000_3ff0ul)]
    [InlineData("CC IOSQES and IOCQES", "14:4:460000", 0x14, 4, 0x46_0000ul)]
    [InlineData("AQA keeps two 12-bit sizes", "24:4:ffffffff", 0x24, 4, 0x0fff_0ffful)]
    [InlineData("ASQ as one qword", "28:8:123456789abcd000", 0x28, 8, 0x1234_5678_9abc_d000ul)]
    [InlineData("ASQ as two dwords", "28:4:9abcd000 2c:4:12345678", 0x28, 8, 0x1234_5678_9abc_d000ul)]
    [InlineData("ACQ high dword alone", "30:8:1000 34:4:1", 0x30, 8, 0x1_0000_1000ul)]
    [InlineData("a 2-byte register write is ignored", "24:2:ffff", 0x24, 4, 0ul)]
    [InlineData("a misaligned register write is ignored", "26:4:ffffffff", 0x24, 8, 0ul)]
    [InlineData("NSSR is not supported", "20:4:4e564d65", 0x20, 4, 0ul)]
    [InlineData("a byte read sees its byte", "24:4:0abc0123", 0x25, 1, 0x01ul)]
    [InlineData("a 2-byte read sees its bytes", "24:4:0abc0123", 0x26, 2, 0x0abcul)]
    public void Register_Written_ReadsBackPerItsKind(string what, string writes, ulong offset, int width, ulong expected)
    {
        foreach (var write in writes.Split(' '))
        {
            var f = write.Split(':');
            var at = ulong.Parse(f[0], NumberStyles.HexNumber, CultureInfo.InvariantCulture);
            var size = uint.Parse(f[1], CultureInfo.InvariantCulture);
            Assert.True(_d.Handle.MmioWrite(0, at, size, ulong.Parse(f[2], NumberStyles.HexNumber, CultureInfo.InvariantCulture)).Ok, what);
        }

        Assert.True(expected == _d.Handle.MmioRead(0, offset, (uint)width), $"{what}: read 0x{_d.Handle.MmioRead(0, offset, (uint)width):x}");
    }

    [Fact]
    public void Enable_ValidAdminQueue_SetsReadyAndDisableDropsTheQueues()
    {
        var admin = _d.Enable(entries: 4);
        Assert.Equal(NvmeController.CstsReady, _d.Csts);
        Assert.Equal(NvmeStatus.Success, _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminGetFeatures, 1, cdw10: NvmeController.FeatureNumberOfQueues)).Status);

        _d.Write32(NvmeController.RegCc, NvmeTestDriver.EnableCc & ~NvmeController.CcEnable);

        Assert.Equal(0u, _d.Csts);
        // The admin queue is gone: its doorbell is ignored (and counted), nothing is fetched or posted.
        var before = _d.Controller.IgnoredDoorbells;
        _d.Submit(admin, NvmeTestDriver.Command(NvmeController.AdminGetFeatures, 2, cdw10: NvmeController.FeatureNumberOfQueues));
        _d.Ring(admin);
        Assert.Equal(before + 1, _d.Controller.IgnoredDoorbells);
        Assert.Null(_d.Poll(admin));

        // Enabled again, the queues start over at slot 0 with phase 1.
        _d.Enable(entries: 4, sqPage: 2, cqPage: 3);
        Assert.Equal(NvmeController.CstsReady, _d.Csts);
        var c = _d.AdminCommand(NvmeTestDriver.Command(NvmeController.AdminGetFeatures, 3, cdw10: NvmeController.FeatureNumberOfQueues));
        Assert.Equal((NvmeStatus.Success, (ushort)3, (ushort)1, true), (c.Status, c.Cid, c.SqHead, c.Phase));
    }

    /// <summary>AQA, ASQ and ACQ, then CC with EN: what CSTS shows. CC 0 then clears CFS, and a valid enable works.</summary>
    [Theory]
    [InlineData("valid", 0x000f_000fu, 0x0ul, 0x0ul, 0u, NvmeController.CstsReady)]
    [InlineData("valid, IOSQES and IOCQES not yet set", 0x000f_000fu, 0x0ul, 0x0ul, 0xff00_0000u, NvmeController.CstsReady)]
    [InlineData("valid, smallest admin queues", 0x0001_0001u, 0x0ul, 0x0ul, 0u, NvmeController.CstsReady)]
    [InlineData("ASQS 0: a one-entry submission queue", 0x000f_0000u, 0x0ul, 0x0ul, 0u, NvmeController.CstsFatal)]
    [InlineData("ACQS 0: a one-entry completion queue", 0x0000_000fu, 0x0ul, 0x0ul, 0u, NvmeController.CstsFatal)]
    [InlineData("AQA 0", 0x0u, 0x0ul, 0x0ul, 0u, NvmeController.CstsFatal)]
    [InlineData("ASQ not page aligned", 0x000f_000fu, 0x100ul, 0x0ul, 0u, NvmeController.CstsFatal)]
    [InlineData("ACQ not page aligned", 0x000f_000fu, 0x0ul, 0x8ul, 0u, NvmeController.CstsFatal)]
    [InlineData("CSS 1 (reserved)", 0x000f_000fu, 0x0ul, 0x0ul, 1u << 4, NvmeController.CstsFatal)]
    [InlineData("CSS 7 (admin only)", 0x000f_000fu, 0x0ul, 0x0ul, 7u << 4, NvmeController.CstsFatal)]
    [InlineData("MPS 8 KiB", 0x000f_000fu, 0x0ul, 0x0ul, 1u << 7, NvmeController.CstsFatal)]
    [InlineData("AMS weighted round robin", 0x000f_000fu, 0x0ul, 0x0ul, 1u << 11, NvmeController.CstsFatal)]
    [InlineData("IOSQES 7", 0x000f_000fu, 0x0ul, 0x0ul, 0x0001_0000u, NvmeController.CstsFatal)]
    [InlineData("IOCQES 5", 0x000f_000fu, 0x0ul, 0x0ul, 0x0010_0000u, NvmeController.CstsFatal)]
    public void Enable_CcAndAqa_ReadyOrFatal(string what, uint aqa, ulong asqOffset, ulong acqOffset, uint ccChange, uint csts)
    {
        _d.Write32(NvmeController.RegAqa, aqa);
        _d.Write64(NvmeController.RegAsq, NvmeTestDriver.Iova(0) + asqOffset);
        _d.Write64(NvmeController.RegAcq, NvmeTestDriver.Iova(1) + acqOffset);
        // ccChange's top byte means "clear IOSQES and IOCQES"; other bits are XORed into a valid CC.
        var cc = (ccChange & 0xff00_0000) != 0 ? NvmeController.CcEnable : NvmeTestDriver.EnableCc ^ ccChange;

        _d.Write32(NvmeController.RegCc, cc);

        Assert.True(csts == _d.Csts, $"{what}: CSTS 0x{_d.Csts:x}");
        _d.Write32(NvmeController.RegCc, 0);
        Assert.Equal(0u, _d.Csts);
        _d.Enable(entries: 4);
        Assert.Equal(NvmeController.CstsReady, _d.Csts);
    }

    [Fact]
    public void Fatal_AdminDoorbell_IsIgnored()
    {
        _d.Write32(NvmeController.RegAqa, 0);
        _d.Write32(NvmeController.RegCc, NvmeTestDriver.EnableCc);
        var before = _d.Controller.IgnoredDoorbells;

        _d.Write32(NvmeTestDriver.SqDoorbell(0), 1);

        Assert.Equal((NvmeController.CstsFatal, before + 1), (_d.Csts, _d.Controller.IgnoredDoorbells));
        Assert.Empty(_d.DrainEvents());
    }

    [Theory]
    [InlineData(1u)] // normal shutdown
    [InlineData(2u)] // abrupt shutdown
    public void Shutdown_Notification_SetsShstCompleteAndClearingItClearsShst(uint shn)
    {
        _d.Enable(entries: 4);

        _d.Write32(NvmeController.RegCc, NvmeTestDriver.EnableCc | (shn << NvmeController.CcShnShift));

        Assert.Equal(NvmeController.CstsReady | NvmeController.CstsShutdownComplete, _d.Csts);
        _d.Write32(NvmeController.RegCc, NvmeTestDriver.EnableCc);
        Assert.Equal(NvmeController.CstsReady, _d.Csts);
    }
}
