using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Grpc.Core;
using Microsoft.Extensions.Time.Testing;
using static DmaBroker.Server.Tests.Errors;

namespace DmaBroker.Server.Tests;

/// <summary>
/// Fault injection (SPEC §14) through a real server and the client library: every kind against an
/// edu device a session drives over Dma.Stream, the refusals, ListFaults and ClearFaults.
/// </summary>
public sealed class FaultInjectionServiceTests
{
    private const uint Group = 14;
    private const string Edu = "0000:08:00.0";
    private const ulong Iova = 0x10_0000;

    /// <summary>A session holding group 14, 64 KiB mapped at <see cref="Iova"/>, the edu device open with Bus Master on, and a DMA channel on it.</summary>
    private sealed class Rig : IAsyncDisposable
    {
        public required BrokerSession Session { get; init; }
        public required DmaBuffer Buffer { get; init; }
        public required VfioDevice Device { get; init; }
        public required DmaChannel Dma { get; init; }

        public static async Task<Rig> StartAsync(TestBroker broker)
        {
            var session = await broker.Client.OpenSessionAsync("rig");
            var container = await session.NewContainerAsync(ContainerType.Type1V2);
            await container.SetGroupAsync(Group);
            var buffer = await session.AllocateAsync(0x10000);
            await container.MapAsync(buffer, Iova);
            var device = await session.OpenDeviceAsync(Edu);
            await device.EnableBusMasterAsync();
            return new Rig { Session = session, Buffer = buffer, Device = device, Dma = await device.OpenDmaChannelAsync() };
        }

        /// <summary>Raises edu interrupt bit 0 and acknowledges it, so the next raise signals again.</summary>
        public async Task RaiseAsync()
        {
            (await Dma.MmioWriteAsync(0, 0x60, 1)).EnsureOk();
            (await Dma.MmioWriteAsync(0, 0x64, 1)).EnsureOk();
        }

        /// <summary>The next session event that is not an interrupt or fault the test does not look at.</summary>
        public async Task<SessionEvent> NextEventAsync(Func<SessionEvent, bool> match)
        {
            while (true)
            {
                var ev = await Session.Events.ReadAsync().AsTask().WaitAsync(TestBroker.Timeout);
                if (match(ev))
                    return ev;
            }
        }

        public async ValueTask DisposeAsync()
        {
            try
            {
                await Dma.DisposeAsync();
            }
            catch (BrokerException)
            {
                // A channel the test broke on purpose.
            }
            await Session.DisposeAsync();
        }
    }

    private static FaultInjection Fault(FaultKind kind, string address = Edu) => new(address, kind);

    [Fact]
    public void FaultKind_CoreAndWire_SameNumbersAndNames()
    {
        var core = Enum.GetValues<Core.Faults.FaultKind>().Select(k => ((int)k, System.Text.RegularExpressions.Regex.Replace(k.ToString(), "(?<=[a-z])(?=[A-Z])", "_").ToUpperInvariant()));
        var wire = KernelReflection.Descriptor.EnumTypes.Single(e => e.Name == nameof(FaultKind)).Values.Where(v => v.Number != 0).Select(v => (v.Number, v.Name["FAULT_KIND_".Length..]));

        Assert.Equal(wire, core);
        Assert.Equal(Protocol.FaultNames.All, wire.Select(w => w.Item2.ToLowerInvariant().Replace('_', '-')));
    }

    [Fact]
    public async Task IommuFault_Count1_NextDmaFaultsUnmappedOnTheCompletionAndTheSession()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        await broker.Client.Admin.InjectFaultAsync(Fault(FaultKind.IommuFault) with { Count = 1 });

        var faulted = await rig.Dma.WriteAsync(Iova, new byte[] { 1, 2, 3 });
        var next = await rig.Dma.WriteAsync(Iova, new byte[] { 4 });

        Assert.Equal((false, FaultReason.Unmapped, Iova), (faulted.Ok, faulted.Fault!.Reason, faulted.Fault.Iova));
        Assert.True(next.Ok);
        var ev = await rig.NextEventAsync(e => e.Fault is not null);
        Assert.Equal((Edu, FaultReason.Unmapped), (ev.Fault.Address, ev.Fault.Reason));
        Assert.Equal(new byte[] { 4, 0, 0 }, await rig.Buffer.ReadAsync(0, 3));
        var listed = Assert.Single(await broker.Client.Admin.ListFaultsAsync());
        Assert.Equal((1ul, true, 100u), (listed.Fired, listed.Spent, listed.ProbabilityPercent));
    }

    [Fact]
    public async Task DeviceError_EduDma_CompletesWithEio()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        await broker.Client.Admin.InjectFaultAsync(Fault(FaultKind.DeviceError));
        (await rig.Dma.MmioWriteAsync(0, 0x80, Iova, 8)).EnsureOk();
        (await rig.Dma.MmioWriteAsync(0, 0x88, 0x40000, 8)).EnsureOk();
        (await rig.Dma.MmioWriteAsync(0, 0x90, 16, 8)).EnsureOk();

        var e = await Assert.ThrowsAsync<DmaRequestException>(async () => (await rig.Dma.MmioWriteAsync(0, 0x98, 1, 8)).EnsureOk());

        Assert.Equal(Errno.EIO, e.Errno);
        Assert.Contains("device error injected", e.Message, StringComparison.Ordinal);
        Assert.Equal(0ul, (await rig.Dma.MmioReadAsync(0, 0x98, 8)).Value & 1);
    }

    [Fact]
    public async Task DropInterrupt_Count1_OnlyTheSecondInterruptArrives()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        await broker.Client.Admin.InjectFaultAsync(Fault(FaultKind.DropInterrupt) with { Count = 1 });

        await rig.RaiseAsync();
        await rig.RaiseAsync();
        // A marker after both: an interrupt travels before the completion of the write that raised it.
        (await rig.Dma.MmioReadAsync(0, 0)).EnsureOk();

        Assert.True(rig.Dma.Interrupts.TryRead(out var vector));
        Assert.Equal(0u, vector);
        Assert.False(rig.Dma.Interrupts.TryRead(out _));
    }

    [Fact]
    public async Task DelayInterrupt_ArrivesWhenTheBrokerClockHasMovedOn()
    {
        var time = new FakeTimeProvider();
        await using var broker = await TestBroker.StartAsync(time, "--lease-ttl-ms", "3600000");
        await using var rig = await Rig.StartAsync(broker);
        await broker.Client.Admin.InjectFaultAsync(Fault(FaultKind.DelayInterrupt) with { Delay = TimeSpan.FromSeconds(5) });

        await rig.RaiseAsync();
        var early = rig.Dma.Interrupts.TryRead(out _);
        time.Advance(TimeSpan.FromSeconds(5));

        Assert.False(early);
        Assert.Equal(0u, await rig.Dma.Interrupts.ReadAsync().AsTask().WaitAsync(TestBroker.Timeout));
        var ev = await rig.NextEventAsync(e => e.Interrupt is not null);
        Assert.Equal(rig.Device.Handle, ev.Interrupt.Handle);
    }

    [Fact]
    public async Task SlowReset_ResetDevice_AnswersOnlyAfterTheDelay()
    {
        var time = new DelayWatchingTimeProvider(TimeSpan.FromSeconds(3));
        await using var broker = await TestBroker.StartAsync(time, "--lease-ttl-ms", "3600000");
        await using var rig = await Rig.StartAsync(broker);
        await broker.Client.Admin.InjectFaultAsync(Fault(FaultKind.SlowReset) with { Delay = TimeSpan.FromSeconds(3), Count = 1 });

        var reset = rig.Device.ResetAsync();
        await time.Armed.WaitAsync(TestBroker.Timeout);
        var doneEarly = reset.IsCompleted;
        time.Advance(TimeSpan.FromSeconds(3));

        Assert.False(doneEarly);
        await reset.WaitAsync(TestBroker.Timeout);
        // Count 1: the next reset is prompt (on a clock that no longer moves).
        await rig.Device.ResetAsync().WaitAsync(TestBroker.Timeout);
    }

    [Fact]
    public async Task SurpriseRemove_DuringHeavyDma_StreamEndsEnodevSessionToldWatchersSeeIt()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        await using var watcher = new Watcher(broker.Client);
        Assert.NotNull((await watcher.NextAsync()).Snapshot);
        var payload = new byte[4096];
        var started = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        // Heavy DMA: writes back to back, many in flight, until the stream breaks.
        var load = Task.Run(async () =>
        {
            var inFlight = new List<Task<DmaResult>>();
            for (var i = 0; ; i++)
            {
                inFlight.Add(rig.Dma.WriteAsync(Iova + (ulong)(i % 16) * 4096, payload));
                if (inFlight.Count < 64)
                    continue;
                try
                {
                    await Task.WhenAll(inFlight);
                }
                catch (BrokerException e) when (e.StatusCode is not null)
                {
                    return e;
                }
                inFlight.Clear();
                started.TrySetResult();
            }
        });
        await started.Task.WaitAsync(TestBroker.Timeout);

        await broker.Client.Admin.InjectFaultAsync(Fault(FaultKind.SurpriseRemove));

        var ended = await load.WaitAsync(TestBroker.Timeout);
        Assert.Equal((StatusCode.NotFound, Errno.ENODEV), (ended.StatusCode, ended.Errno));
        var removed = await rig.NextEventAsync(e => e.DeviceRemoved is not null);
        Assert.Equal(Edu, removed.DeviceRemoved.Address);
        await Expect(Errno.ENODEV, StatusCode.NotFound, () => rig.Device.ReadRegisterAsync(0, 0));
        while ((await watcher.NextAsync()) is not { DeviceRemoved: { } gone } || gone.Address != Edu)
        {
        }
        Assert.DoesNotContain((await broker.Client.ListDevicesAsync()).Devices, d => d.Address == Edu);
        Assert.DoesNotContain((await broker.Client.ListGroupsAsync()).Groups, g => g.Id == Group);
        // The session lives on, and closing the dead device still works.
        await rig.Device.DisposeAsync();
        Assert.Equal(1u, (await broker.Client.Admin.GetStatsAsync()).Sessions);
    }

    [Fact]
    public async Task SurpriseRemove_RawStream_RequestsCompleteEnodev_ThenTheStreamEndsNotFoundEnodev()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        using var call = rig.Session.Raw.Dma.Stream();
        await call.RequestStream.WriteAsync(new DmaRequest { Open = new DmaOpen { Handle = rig.Device.Handle } });
        await broker.Client.Admin.InjectFaultAsync(Fault(FaultKind.SurpriseRemove));

        await call.RequestStream.WriteAsync(new DmaRequest { Tag = 1, Write = new DmaWrite { Iova = Iova, Data = Google.Protobuf.ByteString.CopyFrom(1) } });
        Assert.True(await call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));
        var completion = call.ResponseStream.Current.Completion;
        await call.RequestStream.CompleteAsync();
        var end = await Assert.ThrowsAsync<RpcException>(() => call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));

        Assert.Equal((1ul, false, "ENODEV"), (completion.Tag, completion.Ok, completion.Error.Reason));
        Assert.Equal((StatusCode.NotFound, Errno.ENODEV), (BrokerException.From(end).StatusCode, BrokerException.From(end).Errno));
    }

    [Fact]
    public async Task LinkDown_OwningSessionsConnectionCut_SessionEndsAsConnectionLost()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var rig = await Rig.StartAsync(broker);
        await using var watcher = new Watcher(broker.Client);
        Assert.NotNull((await watcher.NextAsync()).Snapshot);
        (await rig.Dma.WriteAsync(Iova, new byte[] { 1 })).EnsureOk();

        await broker.Client.Admin.InjectFaultAsync(Fault(FaultKind.LinkDown));

        Assert.StartsWith("lost the broker", await rig.Session.Ended.WaitAsync(TestBroker.Timeout), StringComparison.Ordinal);
        var dma = await Assert.ThrowsAnyAsync<BrokerException>(() => rig.Dma.WriteAsync(Iova, new byte[] { 2 }).WaitAsync(TestBroker.Timeout));
        Assert.NotEqual(StatusCode.OK, dma.StatusCode);
        SessionEnded? end = null;
        while (end is null)
            end = (await watcher.NextAsync()).SessionEnded;
        Assert.Equal(rig.Session.Id, end.SessionId);
        Assert.StartsWith("connection lost", end.Reason, StringComparison.Ordinal);
        Assert.Empty(await broker.Client.Admin.ListSessionsAsync());
        Assert.Equal(OwnerKind.None, (await broker.Client.ListGroupsAsync()).Groups.Single(g => g.Id == Group).OwnerKind);
    }

    [Fact]
    public async Task InjectFault_BadRequests_RefusedWithTheirErrno_NothingArmed()
    {
        await using var broker = await TestBroker.StartAsync();
        var admin = broker.Client.Admin;

        await Expect(Errno.ENODEV, StatusCode.NotFound, () => admin.InjectFaultAsync(Fault(FaultKind.IommuFault, "0000:5e:00.0")));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => admin.InjectFaultAsync(Fault(FaultKind.IommuFault, "not-an-address")));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => admin.InjectFaultAsync(Fault(FaultKind.Unspecified)));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => admin.InjectFaultAsync(Fault((FaultKind)42)));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => admin.InjectFaultAsync(Fault(FaultKind.IommuFault) with { ProbabilityPercent = 101 }));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => admin.InjectFaultAsync(Fault(FaultKind.DeviceError) with { Opcode = 2 }));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => admin.InjectFaultAsync(Fault(FaultKind.DelayInterrupt)));
        await Expect(Errno.EINVAL, StatusCode.FailedPrecondition, () => admin.InjectFaultAsync(Fault(FaultKind.LinkDown)));
        await Expect(Errno.ENODEV, StatusCode.NotFound, () => admin.ClearFaultsAsync("0000:5e:00.0"));

        Assert.Empty(await admin.ListFaultsAsync());
    }

    [Fact]
    public async Task ListFaults_ShowsSettingsAndFired_ClearFaultsRemovesByAddressOrAll()
    {
        await using var broker = await TestBroker.StartAsync();
        var admin = broker.Client.Admin;
        var first = await admin.InjectFaultAsync(Fault(FaultKind.IommuFault) with { ProbabilityPercent = 0, Count = 2 });
        var second = await admin.InjectFaultAsync(new FaultInjection("0000:01:00.0", FaultKind.DeviceError) { Opcode = 2, LbaStart = 8, LbaCount = 4, ProbabilityPercent = 25, Seed = 9 });
        await admin.InjectFaultAsync(Fault(FaultKind.DelayInterrupt, "0000:09:00.0") with { Delay = TimeSpan.FromMilliseconds(1500) });

        var listed = await admin.ListFaultsAsync();

        Assert.Equal([first, second, second + 1], listed.Select(f => f.FaultId));
        Assert.Equal((Edu, FaultKind.IommuFault, 2u, 100u, 0ul), (listed[0].Address, listed[0].Kind, listed[0].Count, listed[0].ProbabilityPercent, listed[0].Fired));
        var nvme = listed[1];
        Assert.Equal((0x0004u, 2u, true, 8ul, 4ul, 25u, 9ul), (nvme.Status, nvme.Opcode, nvme.HasOpcode, nvme.LbaStart, nvme.LbaCount, nvme.ProbabilityPercent, nvme.Seed));
        Assert.Equal(1500u, listed[2].DelayMs);
        Assert.Equal(1, await admin.ClearFaultsAsync(Edu));
        Assert.Equal(2, await admin.ClearFaultsAsync());
        Assert.Empty(await admin.ListFaultsAsync());
    }

    [Theory]
    [InlineData("viewer-secret", false)]
    [InlineData("user-secret", false)]
    [InlineData("admin-secret", true)]
    public async Task Roles_InjectAndClearNeedAdmin_ListNeedsViewer(string token, bool admin)
    {
        await using var broker = await SecureBroker.StartAsync($$"""
            { "principals": [
                { "name": "token:viewer", "token_sha256": "{{SecureBroker.Sha256("viewer-secret")}}", "roles": ["viewer"] },
                { "name": "token:user", "token_sha256": "{{SecureBroker.Sha256("user-secret")}}", "roles": ["user"] },
                { "name": "token:admin", "token_sha256": "{{SecureBroker.Sha256("admin-secret")}}", "roles": ["admin"] } ] }
            """);
        var client = broker.Connect(token).Admin;

        Assert.Empty(await client.ListFaultsAsync());
        if (admin)
        {
            Assert.Equal(1ul, await client.InjectFaultAsync(Fault(FaultKind.DropInterrupt)));
            Assert.Equal(1, await client.ClearFaultsAsync());
        }
        else
        {
            await Expect(Errno.EACCES, StatusCode.PermissionDenied, () => client.InjectFaultAsync(Fault(FaultKind.DropInterrupt)));
            await Expect(Errno.EACCES, StatusCode.PermissionDenied, () => client.ClearFaultsAsync());
            Assert.Empty(broker.Broker.Faults.List());
        }
    }

    /// <summary>A fake clock that tells when a timer of a given due time is started (the broker's slow reset wait).</summary>
    private sealed class DelayWatchingTimeProvider(TimeSpan watched) : FakeTimeProvider
    {
        private readonly TaskCompletionSource _armed = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public Task Armed => _armed.Task;

        public override ITimer CreateTimer(TimerCallback callback, object? state, TimeSpan dueTime, TimeSpan period)
        {
            var timer = base.CreateTimer(callback, state, dueTime, period);
            if (dueTime == watched)
                _armed.TrySetResult();
            return timer;
        }
    }
}
