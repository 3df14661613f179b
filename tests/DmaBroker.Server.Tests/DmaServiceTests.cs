using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Google.Protobuf;
using Grpc.Core;
using Microsoft.Extensions.Time.Testing;
using static DmaBroker.Server.Tests.Errors;

namespace DmaBroker.Server.Tests;

/// <summary>§4 and §6 through a real server: memory, mappings, devices and device-initiated DMA.</summary>
public sealed class DmaServiceTests
{
    private const uint Group = 14;
    private const string Edu = "0000:08:00.0";
    private const ulong Iova = 0x10_0000;

    /// <summary>A session holding group 14 with 64 KiB of memory mapped at <see cref="Iova"/> and the edu device open.</summary>
    private sealed class Rig : IAsyncDisposable
    {
        public required BrokerSession Session { get; init; }
        public required ulong Container { get; init; }
        public required ulong Vaddr { get; init; }
        public required ulong Handle { get; init; }

        public static async Task<Rig> StartAsync(TestBroker broker, ContainerType type = ContainerType.Type1V2, bool busMaster = true)
        {
            var session = await broker.Client.OpenSessionAsync("rig");
            var container = await session.CreateContainerAsync(type);
            await session.SetContainerAsync(Group, container);
            var vaddr = (await session.Raw.Memory.AllocateAsync(new AllocateRequest { Size = 0x10000 })).Vaddr;
            await session.Raw.Vfio.MapDmaAsync(new MapDmaRequest { ContainerId = container, Vaddr = vaddr, Iova = Iova, Size = 0x10000, Read = true, Write = true });
            var handle = (await session.Raw.Vfio.OpenDeviceAsync(new OpenDeviceRequest { Address = Edu })).Handle;
            if (busMaster)
                await session.Raw.Vfio.RegionWriteAsync(new RegionWriteRequest { Handle = handle, Index = 7, Offset = 4, Data = ByteString.CopyFrom(0x06, 0x00) });
            return new Rig { Session = session, Container = container, Vaddr = vaddr, Handle = handle };
        }

        public async Task<DmaStream> OpenStreamAsync()
        {
            var stream = new DmaStream(Session.Raw.Dma.Stream());
            await stream.Call.RequestStream.WriteAsync(new DmaRequest { Open = new DmaOpen { Handle = Handle } });
            return stream;
        }

        public ValueTask DisposeAsync() => Session.DisposeAsync();
    }

    private sealed class DmaStream(AsyncDuplexStreamingCall<DmaRequest, DmaResponse> call) : IDisposable
    {
        private int _taken;

        public AsyncDuplexStreamingCall<DmaRequest, DmaResponse> Call { get; } = call;
        public List<DmaInterrupt> Interrupts { get; } = [];

        public async Task<DmaCompletion> SendAsync(DmaRequest request)
        {
            await Call.RequestStream.WriteAsync(request);
            return await NextCompletionAsync();
        }

        public async Task<DmaCompletion> NextCompletionAsync()
        {
            while (true)
            {
                Assert.True(await Call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout), "DMA stream ended");
                var response = Call.ResponseStream.Current;
                if (response.Interrupt is { } interrupt)
                    Interrupts.Add(interrupt);
                else
                    return response.Completion;
            }
        }

        /// <summary>
        /// The device's next interrupt not yet taken: one that came while waiting for a completion, or
        /// the next on the stream (an edu DMA ends after its latency, not with its command's completion).
        /// </summary>
        public async Task<DmaInterrupt> NextInterruptAsync()
        {
            while (_taken == Interrupts.Count)
            {
                Assert.True(await Call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout), "DMA stream ended");
                var response = Call.ResponseStream.Current;
                Assert.True(response.Interrupt is not null, $"expected an interrupt, got {response}");
                Interrupts.Add(response.Interrupt);
            }
            return Interrupts[_taken++];
        }

        public void Dispose() => Call.Dispose();
    }

    private static DmaRequest MmioWrite(ulong tag, ulong offset, ulong value, uint width = 4) =>
        new() { Tag = tag, MmioWrite = new MmioWrite { Index = 0, Offset = offset, Width = width, Value = value } };

    private static DmaRequest MmioRead(ulong tag, ulong offset, uint width = 4) =>
        new() { Tag = tag, MmioRead = new MmioRead { Index = 0, Offset = offset, Width = width } };

    [Fact]
    public async Task EduSequence_ProgramRegistersDmaBothWays_MemoryCheckedAndInterruptsDelivered()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        var payload = Enumerable.Range(0, 1024).Select(i => (byte)(i * 7 + 3)).ToArray();
        await rig.Session.Raw.Memory.WriteAsync(new WriteRequest { Vaddr = rig.Vaddr, Data = ByteString.CopyFrom(payload) });
        using var dma = await rig.OpenStreamAsync();

        Assert.Equal(0x010000edul, (await dma.SendAsync(MmioRead(1, 0x00))).Value);
        Assert.True((await dma.SendAsync(MmioWrite(2, 0x04, 0x12345678))).Ok);
        Assert.Equal(~0x12345678u, (uint)(await dma.SendAsync(MmioRead(3, 0x04))).Value);
        await dma.SendAsync(MmioWrite(4, 0x08, 10));
        Assert.Equal(3628800ul, (await dma.SendAsync(MmioRead(5, 0x08))).Value);

        // RAM -> device buffer, with the completion interrupt.
        await dma.SendAsync(MmioWrite(6, 0x80, Iova, 8));
        await dma.SendAsync(MmioWrite(7, 0x88, 0x40000, 8));
        await dma.SendAsync(MmioWrite(8, 0x90, (ulong)payload.Length, 8));
        var toDevice = await dma.SendAsync(MmioWrite(9, 0x98, 0x1 | 0x4, 8));
        Assert.True(toDevice.Ok, toDevice.ToString());
        Assert.Equal(0u, (await dma.NextInterruptAsync()).Vector);
        Assert.Equal((0x4ul, 0x100ul), ((await dma.SendAsync(MmioRead(10, 0x98, 8))).Value, (await dma.SendAsync(MmioRead(10, 0x24))).Value));
        await dma.SendAsync(MmioWrite(11, 0x64, 0x100));

        // Device buffer -> RAM one page further on.
        await dma.SendAsync(MmioWrite(12, 0x80, 0x40000, 8));
        await dma.SendAsync(MmioWrite(13, 0x88, Iova + 0x1000, 8));
        var toRam = await dma.SendAsync(MmioWrite(14, 0x98, 0x1 | 0x2 | 0x4, 8));
        Assert.True(toRam.Ok, toRam.ToString());
        await dma.NextInterruptAsync();

        var copied = await rig.Session.Raw.Memory.ReadAsync(new ReadRequest { Vaddr = rig.Vaddr + 0x1000, Size = (uint)payload.Length });
        Assert.Equal(payload, copied.Data.ToByteArray());
        Assert.Equal(2, dma.Interrupts.Count);
        // The same interrupts reach the session stream, naming the handle.
        for (var i = 0; i < 2; i++)
        {
            var ev = await rig.Session.Events.ReadAsync().AsTask().WaitAsync(TestBroker.Timeout);
            Assert.Equal((rig.Handle, 0u), (ev.Interrupt.Handle, ev.Interrupt.Vector));
        }
    }

    /// <summary>
    /// SPEC §14 edu fidelity through region writes (pwrite on the device fd): the command's start bit
    /// reads set, and nothing lands, until the broker's clock passes the device's DMA latency.
    /// </summary>
    [Fact]
    public async Task EduDmaByRegionWrites_StartBitSetUntilTheLatencyPasses_ThenDataAndInterrupt()
    {
        var time = new FakeTimeProvider();
        await using var broker = await TestBroker.StartAsync(time);
        await using var rig = await Rig.StartAsync(broker);
        var latency = TimeSpan.FromMicroseconds(Core.Topology.PciFunctionSpec.DefaultDmaLatencyUs);
        var payload = Enumerable.Range(0, 64).Select(i => (byte)(i + 1)).ToArray();
        await rig.Session.Raw.Memory.WriteAsync(new WriteRequest { Vaddr = rig.Vaddr, Data = ByteString.CopyFrom(payload) });

        foreach (var (source, destination, command) in new[] { (Iova, 0x40000ul, 0x1ul | 0x4), (0x40000ul, Iova + 0x1000, 0x1ul | 0x2 | 0x4) })
        {
            await Bar0WriteAsync(rig, 0x80, source);
            await Bar0WriteAsync(rig, 0x88, destination);
            await Bar0WriteAsync(rig, 0x90, (ulong)payload.Length);
            await Bar0WriteAsync(rig, 0x98, command);
            Assert.Equal(command, await Bar0ReadAsync(rig, 0x98));

            time.Advance(latency);

            Assert.Equal(command & ~1ul, await Bar0ReadAsync(rig, 0x98));
            var ev = await rig.Session.Events.ReadAsync().AsTask().WaitAsync(TestBroker.Timeout);
            Assert.Equal((rig.Handle, 0u), (ev.Interrupt.Handle, ev.Interrupt.Vector));
        }
        var copied = await rig.Session.Raw.Memory.ReadAsync(new ReadRequest { Vaddr = rig.Vaddr + 0x1000, Size = (uint)payload.Length });
        Assert.Equal(payload, copied.Data.ToByteArray());
    }

    private static async Task Bar0WriteAsync(Rig rig, ulong offset, ulong value) =>
        await rig.Session.Raw.Vfio.RegionWriteAsync(new RegionWriteRequest { Handle = rig.Handle, Index = 0, Offset = offset, Data = ByteString.CopyFrom(BitConverter.GetBytes(value)) });

    private static async Task<ulong> Bar0ReadAsync(Rig rig, ulong offset) =>
        BitConverter.ToUInt64((await rig.Session.Raw.Vfio.RegionReadAsync(new RegionReadRequest { Handle = rig.Handle, Index = 0, Offset = offset, Size = 8 })).Data.Span);

    [Fact]
    public async Task StreamOps_WriteReadCopyBatch_CompletionsInOrderOnePerTag()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        using var dma = await rig.OpenStreamAsync();
        var data = ByteString.CopyFrom(Enumerable.Range(0, 6000).Select(i => (byte)i).ToArray());

        Assert.True((await dma.SendAsync(new DmaRequest { Tag = 1, Write = new DmaWrite { Iova = Iova + 100, Data = data } })).Ok);
        var read = await dma.SendAsync(new DmaRequest { Tag = 2, Read = new DmaRead { Iova = Iova + 100, Length = 6000 } });
        Assert.Equal(data, read.Data);
        Assert.True((await dma.SendAsync(new DmaRequest { Tag = 3, Copy = new DmaCopy { SrcIova = Iova + 100, DstIova = Iova + 0x8000, Length = 6000 } })).Ok);
        var memory = await rig.Session.Raw.Memory.ReadAsync(new ReadRequest { Vaddr = rig.Vaddr + 0x8000, Size = 6000 });
        Assert.Equal(data, memory.Data);

        var batch = new DmaBatch();
        for (ulong tag = 100; tag < 164; tag++)
            batch.Requests.Add(new DmaRequest { Tag = tag, Write = new DmaWrite { Iova = Iova + (tag - 100) * 64, Data = ByteString.CopyFrom(new byte[64]) } });
        batch.Requests.Add(new DmaRequest { Tag = 164, Batch = new DmaBatch() });
        await dma.Call.RequestStream.WriteAsync(new DmaRequest { Tag = 99, Batch = batch });
        for (ulong tag = 100; tag < 164; tag++)
        {
            var c = await dma.NextCompletionAsync();
            Assert.Equal((tag, true), (c.Tag, c.Ok));
        }
        var nested = await dma.NextCompletionAsync();
        Assert.Equal((164ul, false, "EINVAL"), (nested.Tag, nested.Ok, nested.Error.Reason));
    }

    // Every outcome a batched request can have: success with and without data, a register value,
    // an IOMMU fault, and the EINVAL of a request naming no operation and of a nested batch.
    private static DmaBatch MixedBatch(bool coalesce)
    {
        var batch = new DmaBatch { Coalesce = coalesce };
        batch.Requests.Add(new DmaRequest { Tag = 1, Write = new DmaWrite { Iova = Iova + 64, Data = ByteString.CopyFromUtf8("coalesced") } });
        batch.Requests.Add(new DmaRequest { Tag = 2, Read = new DmaRead { Iova = Iova + 64, Length = 9 } });
        batch.Requests.Add(new DmaRequest { Tag = 3, Write = new DmaWrite { Iova = 0x900000, Data = ByteString.CopyFromUtf8("lost") } });
        batch.Requests.Add(new DmaRequest { Tag = 4 });
        batch.Requests.Add(new DmaRequest { Tag = 5, Batch = new DmaBatch { Requests = { MmioRead(6, 0x00) } } });
        batch.Requests.Add(MmioRead(7, 0x00));
        return batch;
    }

    private static async Task<DmaResponse> NextResponseAsync(DmaStream dma)
    {
        Assert.True(await dma.Call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout), "DMA stream ended");
        return dma.Call.ResponseStream.Current;
    }

    [Fact]
    public async Task StreamBatch_Coalesced_OneBatchCompletionWithEachResultInItsSlot()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        using var dma = await rig.OpenStreamAsync();

        await dma.Call.RequestStream.WriteAsync(new DmaRequest { Tag = 50, Batch = MixedBatch(coalesce: true) });
        await dma.Call.RequestStream.WriteAsync(new DmaRequest { Tag = 60, Batch = new DmaBatch { Coalesce = true } });
        await dma.Call.RequestStream.WriteAsync(MmioRead(70, 0x00));

        var first = await NextResponseAsync(dma);
        Assert.Equal(DmaResponse.ResponseOneofCase.BatchCompletion, first.ResponseCase);
        var results = first.BatchCompletion.Results;
        Assert.Equal(50ul, first.BatchCompletion.Tag);
        Assert.Equal([1ul, 2, 3, 4, 5, 7], results.Select(r => r.Tag));
        Assert.True(results[0].Ok);
        Assert.Equal((true, "coalesced"), (results[1].Ok, results[1].Data.ToStringUtf8()));
        Assert.Equal((false, 0x900000ul, Access.Write, FaultReason.Unmapped), (results[2].Ok, results[2].Fault.Iova, results[2].Fault.Access, results[2].Fault.Reason));
        Assert.Equal((false, "EINVAL"), (results[3].Ok, results[3].Error.Reason));
        Assert.Equal((false, "EINVAL"), (results[4].Ok, results[4].Error.Reason));
        Assert.Equal((true, 0x010000edul), (results[5].Ok, results[5].Value));
        // An empty coalesced batch is still answered, and a lone request after the batches gets its
        // own completion: nothing else came for the batches.
        var empty = await NextResponseAsync(dma);
        Assert.Equal((60ul, 0), (empty.BatchCompletion.Tag, empty.BatchCompletion.Results.Count));
        var after = await NextResponseAsync(dma);
        Assert.Equal((70ul, 0x010000edul), (after.Completion.Tag, after.Completion.Value));
        var ev = await rig.Session.Events.ReadAsync().AsTask().WaitAsync(TestBroker.Timeout);
        Assert.Equal((Edu, 0x900000ul, FaultReason.Unmapped), (ev.Fault.Address, ev.Fault.Iova, ev.Fault.Reason));
    }

    [Fact]
    public async Task StreamBatch_CoalescedOrNot_SameResultPerRequest()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        using var dma = await rig.OpenStreamAsync();

        await dma.Call.RequestStream.WriteAsync(new DmaRequest { Tag = 50, Batch = MixedBatch(coalesce: false) });
        var separate = new List<DmaCompletion>();
        for (var i = 0; i < 6; i++)
            separate.Add((await NextResponseAsync(dma)).Completion);
        await dma.Call.RequestStream.WriteAsync(new DmaRequest { Tag = 51, Batch = MixedBatch(coalesce: true) });
        var coalesced = (await NextResponseAsync(dma)).BatchCompletion;

        Assert.Equal(51ul, coalesced.Tag);
        Assert.Equal(separate, coalesced.Results);
    }

    [Theory]
    [InlineData(0x900000ul)]
    [InlineData(Iova + 0xf000)]   // the first page is mapped, the second falls off the mapping
    public async Task StreamWrite_Unmapped_FaultsWritesNothingAndReportsOnSession(ulong iova)
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        using var dma = await rig.OpenStreamAsync();
        var c = await dma.SendAsync(new DmaRequest { Tag = 1, Write = new DmaWrite { Iova = iova, Data = ByteString.CopyFrom(new byte[8192].Select(_ => (byte)0xaa).ToArray()) } });

        Assert.False(c.Ok);
        Assert.Equal((Access.Write, FaultReason.Unmapped), (c.Fault.Access, c.Fault.Reason));
        Assert.Equal(Math.Max(iova, Iova + 0x10000), c.Fault.Iova);
        var memory = await rig.Session.Raw.Memory.ReadAsync(new ReadRequest { Vaddr = rig.Vaddr, Size = 0x10000 });
        Assert.All(memory.Data.ToByteArray(), b => Assert.Equal(0, b));
        var ev = await rig.Session.Events.ReadAsync().AsTask().WaitAsync(TestBroker.Timeout);
        Assert.Equal((Edu, c.Fault.Iova, FaultReason.Unmapped), (ev.Fault.Address, ev.Fault.Iova, ev.Fault.Reason));
    }

    [Fact]
    public async Task StreamDma_BusMasterOffThenReadOnlyMapping_FaultsWithReason()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker, busMaster: false);
        using var dma = await rig.OpenStreamAsync();
        var off = await dma.SendAsync(new DmaRequest { Tag = 1, Read = new DmaRead { Iova = Iova, Length = 16 } });
        Assert.Equal(FaultReason.BusMasterOff, off.Fault.Reason);

        await dma.SendAsync(new DmaRequest { Tag = 2, MmioWrite = new MmioWrite { Index = 7, Offset = 4, Width = 2, Value = 0x6 } });
        var vaddr = (await rig.Session.Raw.Memory.AllocateAsync(new AllocateRequest { Size = 4096 })).Vaddr;
        await rig.Session.Raw.Vfio.MapDmaAsync(new MapDmaRequest { ContainerId = rig.Container, Vaddr = vaddr, Iova = 0x80_0000, Size = 4096, Read = true });
        var denied = await dma.SendAsync(new DmaRequest { Tag = 3, Write = new DmaWrite { Iova = 0x80_0000, Data = ByteString.CopyFromUtf8("x") } });
        Assert.Equal((Access.Write, FaultReason.Permission), (denied.Fault.Access, denied.Fault.Reason));
    }

    [Fact]
    public async Task EduBadProgramming_DmaFailsWithErrorAndDeviceKeepsWorking()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        using var dma = await rig.OpenStreamAsync();
        await dma.SendAsync(MmioWrite(1, 0x80, Iova, 8));
        await dma.SendAsync(MmioWrite(2, 0x88, 0x40f00, 8));
        await dma.SendAsync(MmioWrite(3, 0x90, 0x1000, 8));
        var bad = await dma.SendAsync(MmioWrite(4, 0x98, 0x1, 8));
        Assert.Equal((false, "EIO"), (bad.Ok, bad.Error.Reason));
        Assert.Contains("outside the device buffer", bad.Error.Message, StringComparison.Ordinal);
        Assert.Equal(0x010000edul, (await dma.SendAsync(MmioRead(5, 0x00))).Value);
        Assert.Equal(0ul, (await dma.SendAsync(MmioRead(6, 0x98, 8))).Value & 1);
    }

    [Fact]
    public async Task StreamBadInput_ClearErrorsPerRequestAndStreamContinues()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        using var dma = await rig.OpenStreamAsync();
        Assert.Equal("EINVAL", (await dma.SendAsync(new DmaRequest { Tag = 1, Read = new DmaRead { Iova = Iova, Length = 64 * 1024 * 1024 } })).Error.Reason);
        Assert.Equal("EINVAL", (await dma.SendAsync(new DmaRequest { Tag = 2, MmioRead = new MmioRead { Index = 0, Offset = 0x100000, Width = 4 } })).Error.Reason);
        Assert.Equal("EINVAL", (await dma.SendAsync(new DmaRequest { Tag = 3, MmioRead = new MmioRead { Index = 6, Offset = 0, Width = 4 } })).Error.Reason);
        Assert.Equal("EINVAL", (await dma.SendAsync(new DmaRequest { Tag = 4, MmioRead = new MmioRead { Index = 0, Offset = 0, Width = 3 } })).Error.Reason);
        Assert.Equal("EINVAL", (await dma.SendAsync(new DmaRequest { Tag = 5 })).Error.Reason);
        Assert.Equal("EINVAL", (await dma.SendAsync(new DmaRequest { Tag = 6, Open = new DmaOpen { Handle = rig.Handle } })).Error.Reason);
        var wrap = await dma.SendAsync(new DmaRequest { Tag = 7, Read = new DmaRead { Iova = ulong.MaxValue - 10, Length = 100 } });
        Assert.Equal(FaultReason.Unmapped, wrap.Fault.Reason);
        Assert.True((await dma.SendAsync(MmioRead(8, 0x00))).Ok);
    }

    [Fact]
    public async Task StreamOpen_UnknownHandleOrMissingOpen_ClearStatus()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        using (var call = rig.Session.Raw.Dma.Stream())
        {
            await call.RequestStream.WriteAsync(new DmaRequest { Open = new DmaOpen { Handle = 999 } });
            var e = await Assert.ThrowsAsync<RpcException>(() => call.ResponseStream.MoveNext());
            Assert.Equal((StatusCode.NotFound, Errno.EBADF), (e.StatusCode, BrokerException.From(e).Errno));
        }
        using (var call = rig.Session.Raw.Dma.Stream())
        {
            await call.RequestStream.WriteAsync(new DmaRequest { Tag = 1, Read = new DmaRead { Iova = Iova, Length = 1 } });
            var e = await Assert.ThrowsAsync<RpcException>(() => call.ResponseStream.MoveNext());
            Assert.Equal((StatusCode.InvalidArgument, Errno.EINVAL), (e.StatusCode, BrokerException.From(e).Errno));
        }
    }

    [Fact]
    public async Task MapAndUnmap_ThroughServer_FlavourRulesAndIommuInfo()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var session = await broker.Client.OpenSessionAsync("maps");
        var type1 = await session.CreateContainerAsync(ContainerType.Type1V2);
        var vaddr = (await session.Raw.Memory.AllocateAsync(new AllocateRequest { Size = 0x4000 })).Vaddr;
        await Expect(Errno.EINVAL, StatusCode.FailedPrecondition, () => session.CallAsync(v => v.GetIommuInfoAsync(new GetIommuInfoRequest { ContainerId = type1 })));
        await session.SetContainerAsync(Group, type1);
        var info = await session.CallAsync(v => v.GetIommuInfoAsync(new GetIommuInfoRequest { ContainerId = type1 }));
        Assert.Equal((4096ul, 65535u, 2), (info.PageSizes, info.DmaAvail, info.IovaRanges.Count));
        Assert.Equal((0xfedffffful, 0xfef00000ul, (1ul << 48) - 1), (info.IovaRanges[0].End, info.IovaRanges[1].Start, info.IovaRanges[1].End));

        await session.CallAsync(v => v.MapDmaAsync(new MapDmaRequest { ContainerId = type1, Vaddr = vaddr, Iova = 0, Size = 0x4000, Read = true }));
        await Expect(Errno.EEXIST, StatusCode.AlreadyExists, () => session.CallAsync(v => v.MapDmaAsync(new MapDmaRequest { ContainerId = type1, Vaddr = vaddr, Iova = 0x2000, Size = 0x1000, Write = true })));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => session.CallAsync(v => v.MapDmaAsync(new MapDmaRequest { ContainerId = type1, Vaddr = vaddr, Size = 0x1000, Write = true })));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => session.CallAsync(v => v.MapDmaAsync(new MapDmaRequest { ContainerId = type1, Vaddr = vaddr, Iova = 0xfee00000, Size = 0x1000, Write = true })));
        await Expect(Errno.EFAULT, StatusCode.InvalidArgument, () => session.CallAsync(v => v.MapDmaAsync(new MapDmaRequest { ContainerId = type1, Vaddr = vaddr + 0x4000, Iova = 0x10000, Size = 0x1000, Write = true })));
        await Expect(Errno.EBUSY, StatusCode.FailedPrecondition, () => Call(() => session.Raw.Memory.FreeAsync(new FreeRequest { Vaddr = vaddr }).ResponseAsync));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => session.CallAsync(v => v.UnmapDmaAsync(new UnmapDmaRequest { ContainerId = type1, Iova = 0x1000, Size = 0x1000 })));
        Assert.Equal(0ul, (await session.CallAsync(v => v.UnmapDmaAsync(new UnmapDmaRequest { ContainerId = type1, Iova = 0x100000, Size = 0x1000 }))).Unmapped);
        Assert.Equal(0x4000ul, (await session.CallAsync(v => v.UnmapDmaAsync(new UnmapDmaRequest { ContainerId = type1, All = true }))).Unmapped);

        var iommufd = await session.CreateContainerAsync(ContainerType.Iommufd);
        var picked = (await session.CallAsync(v => v.MapDmaAsync(new MapDmaRequest { ContainerId = iommufd, Vaddr = vaddr, Size = 0x2000, Read = true, Write = true }))).Iova;
        Assert.True(picked != 0 && picked % 4096 == 0);
        await Expect(Errno.ENOENT, StatusCode.NotFound, () => session.CallAsync(v => v.UnmapDmaAsync(new UnmapDmaRequest { ContainerId = iommufd, Iova = picked, Size = 0x1000 })));
        await Expect(Errno.ENOENT, StatusCode.NotFound, () => session.CallAsync(v => v.UnmapDmaAsync(new UnmapDmaRequest { ContainerId = iommufd, Iova = 0x7000_0000, Size = 0x1000 })));
        Assert.Equal(0x2000ul, (await session.CallAsync(v => v.UnmapDmaAsync(new UnmapDmaRequest { ContainerId = iommufd, Iova = picked, Size = 0x2000 }))).Unmapped);
        await session.Raw.Memory.FreeAsync(new FreeRequest { Vaddr = vaddr });
    }

    [Fact]
    public async Task Memory_LimitsAndBadRanges_ClearErrors()
    {
        await using var broker = await TestBroker.StartAsync(null, "--memory-limit-mb", "1");
        await using var session = await broker.Client.OpenSessionAsync("mem");
        var memory = session.Raw.Memory;
        await Expect(Errno.ENOMEM, StatusCode.ResourceExhausted, () => Call(() => memory.AllocateAsync(new AllocateRequest { Size = 2 * 1024 * 1024 }).ResponseAsync));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => Call(() => memory.AllocateAsync(new AllocateRequest { Size = 0 }).ResponseAsync));
        var vaddr = (await memory.AllocateAsync(new AllocateRequest { Size = 100 })).Vaddr;
        Assert.Equal(0ul, vaddr % 4096);
        Assert.NotEqual(0ul, vaddr);
        await Expect(Errno.EFAULT, StatusCode.InvalidArgument, () => Call(() => memory.ReadAsync(new ReadRequest { Vaddr = vaddr + 4000, Size = 200 }).ResponseAsync));
        await Expect(Errno.EFAULT, StatusCode.InvalidArgument, () => Call(() => memory.WriteAsync(new WriteRequest { Vaddr = 0x1000, Data = ByteString.CopyFromUtf8("x") }).ResponseAsync));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => Call(() => memory.FreeAsync(new FreeRequest { Vaddr = vaddr + 4096 }).ResponseAsync));
        await memory.FreeAsync(new FreeRequest { Vaddr = vaddr });
    }

    [Theory]
    [InlineData((4 << 20) + 1)]
    [InlineData(8 << 20)]
    public async Task MemoryWrite_OverTheDocumentedFourMiB_EinvalAndNothingWritten(int size)
    {
        await using var broker = await TestBroker.StartAsync(null, "--memory-limit-mb", "16");
        await using var session = await broker.Client.OpenSessionAsync("big-write");
        var buffer = await session.AllocateAsync(9UL << 20);
        var e = await Expect(Errno.EINVAL, StatusCode.InvalidArgument,
            () => Call(() => session.Raw.Memory.WriteAsync(new WriteRequest { Vaddr = buffer.Vaddr, Data = ByteString.CopyFrom(Enumerable.Repeat((byte)0xab, size).ToArray()) }).ResponseAsync));
        Assert.Contains("4194304", e.Message, StringComparison.Ordinal);
        Assert.All(await buffer.ReadAsync(0, 4096), b => Assert.Equal(0, b));
        // The documented maximum itself is accepted.
        await buffer.WriteAsync(0, new byte[4 << 20]);
    }

    [Fact]
    public async Task Devices_OpenRulesAndResetOnClose()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        await using var other = await broker.Client.OpenSessionAsync("other");
        await Expect(Errno.EPERM, StatusCode.PermissionDenied, () => other.CallAsync(v => v.OpenDeviceAsync(new OpenDeviceRequest { Address = Edu })));
        await Expect(Errno.EINVAL, StatusCode.FailedPrecondition, () => other.CallAsync(v => v.OpenDeviceAsync(new OpenDeviceRequest { Address = "0000:09:00.0" })));
        await Expect(Errno.ENODEV, StatusCode.FailedPrecondition, () => other.CallAsync(v => v.OpenDeviceAsync(new OpenDeviceRequest { Address = "0000:01:00.0" })));
        await Expect(Errno.EBUSY, StatusCode.FailedPrecondition, () => rig.Session.CallAsync(v => v.OpenDeviceAsync(new OpenDeviceRequest { Address = Edu })));
        await Expect(Errno.EBUSY, StatusCode.FailedPrecondition, () => rig.Session.UnsetContainerAsync(Group));

        var config = await rig.Session.CallAsync(v => v.RegionReadAsync(new RegionReadRequest { Handle = rig.Handle, Index = 7, Offset = 0, Size = 6 }));
        Assert.Equal(new byte[] { 0x34, 0x12, 0xe8, 0x11, 0x06, 0x00 }, config.Data.ToByteArray());
        await rig.Session.CallAsync(v => v.CloseDeviceAsync(new CloseDeviceRequest { Handle = rig.Handle }));
        await Expect(Errno.EBADF, StatusCode.NotFound, () => rig.Session.CallAsync(v => v.RegionReadAsync(new RegionReadRequest { Handle = rig.Handle, Index = 7, Size = 4 })));
        var reopened = (await rig.Session.CallAsync(v => v.OpenDeviceAsync(new OpenDeviceRequest { Address = Edu }))).Handle;
        var command = await rig.Session.CallAsync(v => v.RegionReadAsync(new RegionReadRequest { Handle = reopened, Index = 7, Offset = 4, Size = 2 }));
        Assert.Equal(new byte[] { 0, 0 }, command.Data.ToByteArray());
    }
}

/// <summary>§5 teardown under load, through a real server.</summary>
public sealed class DmaTeardownTests
{
    [Fact]
    public async Task SessionCancelledDuringHeavyDma_ReleasedAfterQuiesceAndNextOwnerFindsDeviceReset()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var watcher = new Watcher(broker.Client);
        await watcher.NextAsync();

        // Session A, on a raw stream we can cancel, keeps a DMA stream busy with 64 KiB writes.
        using var cancelA = new CancellationTokenSource();
        using var openA = broker.Client.Raw.Session.Open(cancellationToken: cancelA.Token);
        Assert.True(await openA.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));
        var tokenA = openA.ResponseStream.Current.Opened.Token;
        var vfioA = broker.VfioWithToken(tokenA);
        var metadata = new Metadata { { BrokerSession.TokenHeader, tokenA } };
        var memoryA = new Memory.MemoryClient(broker.Client.Raw.Channel);
        var dmaA = new Dma.DmaClient(broker.Client.Raw.Channel);
        var container = (await vfioA.CreateContainerAsync(new CreateContainerRequest { Type = ContainerType.Iommufd })).ContainerId;
        await vfioA.SetContainerAsync(new SetContainerRequest { GroupId = 14, ContainerId = container });
        var vaddr = (await memoryA.AllocateAsync(new AllocateRequest { Size = 1 << 20 }, metadata)).Vaddr;
        await vfioA.MapDmaAsync(new MapDmaRequest { ContainerId = container, Vaddr = vaddr, Iova = 0x100000, Size = 1 << 20, Read = true, Write = true });
        var handle = (await vfioA.OpenDeviceAsync(new OpenDeviceRequest { Address = "0000:08:00.0" })).Handle;
        await vfioA.RegionWriteAsync(new RegionWriteRequest { Handle = handle, Index = 7, Offset = 4, Data = ByteString.CopyFrom(0x06, 0x00) });
        await vfioA.RegionWriteAsync(new RegionWriteRequest { Handle = handle, Index = 0, Offset = 0x04, Data = ByteString.CopyFrom(1, 2, 3, 4) });
        await watcher.WaitForGroupAsync(g => g.Id == 14 && g.OwnerKind == OwnerKind.User);

        using var stream = dmaA.Stream(metadata);
        await stream.RequestStream.WriteAsync(new DmaRequest { Open = new DmaOpen { Handle = handle } });
        var payload = ByteString.CopyFrom(new byte[64 * 1024]);
        var completed = 0;
        var pump = Task.Run(async () =>
        {
            try
            {
                for (ulong tag = 0; ; tag++)
                    await stream.RequestStream.WriteAsync(new DmaRequest { Tag = tag, Write = new DmaWrite { Iova = 0x100000 + tag % 16 * 0x10000, Data = payload } });
            }
            catch (Exception e) when (e is RpcException or InvalidOperationException or IOException or OperationCanceledException)
            {
                // The session died under us: expected.
            }
        });
        while (await stream.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout) && ++completed < 200)
        {
        }
        Assert.Equal(200, completed);

        var coreA = broker.Broker.Sessions.Find(openA.ResponseStream.Current.Opened.SessionId);
        await cancelA.CancelAsync();
        await watcher.WaitForGroupAsync(g => g.Id == 14 && g.OwnerKind == OwnerKind.None);
        await pump.WaitAsync(TestBroker.Timeout);
        // Ending is idempotent: this awaits the teardown the cancellation started.
        await broker.Broker.Sessions.EndAsync(coreA, Core.Sessions.SessionEndReason.ClientClosed).WaitAsync(TestBroker.Timeout);
        var stats = await broker.Client.Admin.GetStatsAsync();
        Assert.Equal((0u, 0u, 0ul, 0u, 0u, 0u), (stats.Sessions, stats.Containers, stats.MemoryBytes, stats.OpenDevices, stats.DmaStreams, stats.Mappings));

        // The next owner finds the device reset: Bus Master off, liveness register back to its power-on value.
        await using var b = await broker.Client.OpenSessionAsync("next-owner");
        await b.SetContainerAsync(14, await b.CreateContainerAsync(ContainerType.Type1V2));
        var reopened = (await b.CallAsync(v => v.OpenDeviceAsync(new OpenDeviceRequest { Address = "0000:08:00.0" }))).Handle;
        var command = await b.CallAsync(v => v.RegionReadAsync(new RegionReadRequest { Handle = reopened, Index = 7, Offset = 4, Size = 2 }));
        Assert.Equal(new byte[] { 0, 0 }, command.Data.ToByteArray());
        var liveness = await b.CallAsync(v => v.RegionReadAsync(new RegionReadRequest { Handle = reopened, Index = 0, Offset = 4, Size = 4 }));
        Assert.Equal(new byte[] { 0, 0, 0, 0 }, liveness.Data.ToByteArray()); // a fresh edu reads 0; before the reset it read ~0x04030201
    }
}

/// <summary>DMA streams of a session that is ending or ended.</summary>
public sealed class DmaStreamSessionEndTests
{
    [Fact]
    public async Task Stream_SessionRevokedWhileOpen_StreamEndsUnauthenticated()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var session = await broker.Client.OpenSessionAsync("revoked");
        var container = await session.NewContainerAsync(ContainerType.Type1V2);
        await container.SetGroupAsync(16);
        var device = await session.OpenDeviceAsync("0000:0a:00.0");
        using var call = session.Raw.Dma.Stream();
        await call.RequestStream.WriteAsync(new DmaRequest { Open = new DmaOpen { Handle = device.Handle } });
        await call.RequestStream.WriteAsync(new DmaRequest { Tag = 1, MmioRead = new MmioRead { Index = 0, Offset = 0, Width = 4 } });
        Assert.True(await call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));

        await broker.Client.Admin.RevokeSessionAsync(session.Id);

        var e = await Assert.ThrowsAsync<RpcException>(() => call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));
        Assert.Equal((StatusCode.Unauthenticated, Errno.EACCES), (e.StatusCode, BrokerException.From(e).Errno));
        var stats = await broker.Client.Admin.GetStatsAsync();
        Assert.Equal((0u, 0u, 0u), (stats.Sessions, stats.OpenDevices, stats.UserOwnedGroups));
    }

    [Fact]
    public async Task Stream_AfterSessionEnded_Unauthenticated()
    {
        await using var broker = await TestBroker.StartAsync();
        var session = await broker.Client.OpenSessionAsync("gone");
        var dma = session.Raw.Dma;
        await session.DisposeAsync();
        using var call = dma.Stream();
        try
        {
            await call.RequestStream.WriteAsync(new DmaRequest { Open = new DmaOpen { Handle = 1 } });
        }
        catch (Exception write) when (write is RpcException or InvalidOperationException)
        {
            // The broker refuses the stream before reading it, so it may have ended before this write:
            // the refusal is read below either way.
        }
        var e = await Assert.ThrowsAsync<RpcException>(() => call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));
        Assert.Equal((StatusCode.Unauthenticated, Errno.EACCES), (e.StatusCode, BrokerException.From(e).Errno));
    }
}
