using DmaBroker.Server.Hosting;
using Grpc.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace DmaBroker.Server.Tests;

/// <summary>The guard every server test runs under: a broker error the test did not expect fails it.</summary>
public sealed class BrokerLogTests
{
    private const int BugEventId = 101;

    [Fact]
    public async Task Dispose_BrokerLoggedUnexpectedError_FailsPrintingTheRecords()
    {
        var broker = await TestBroker.StartAsync().WaitAsync(TestBroker.Timeout);
        LogBug(broker, "a bug nobody expected");

        var failure = await Assert.ThrowsAsync<Xunit.Sdk.XunitException>(() => broker.DisposeAsync().AsTask().WaitAsync(TestBroker.Timeout));

        Assert.Contains("1 error(s) the test did not expect", failure.Message, StringComparison.Ordinal);
        Assert.Contains($"Error {typeof(ErrorInterceptor).FullName}[{BugEventId}]: a bug nobody expected", failure.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Dispose_ErrorDeclaredExpected_Passes()
    {
        var broker = await TestBroker.StartAsync().WaitAsync(TestBroker.Timeout);
        broker.ExpectErrors(r => r.EventId.Id == BugEventId);
        LogBug(broker, "a bug this test provokes on purpose");

        await broker.DisposeAsync().AsTask().WaitAsync(TestBroker.Timeout);

        Assert.Single(broker.Log.Records);
    }

    [Fact]
    public async Task Dispose_WarningOnly_Passes()
    {
        var broker = await TestBroker.StartAsync().WaitAsync(TestBroker.Timeout);
        Logger(broker).LogWarning("worth a look, not a failure");

        await broker.DisposeAsync().AsTask().WaitAsync(TestBroker.Timeout);

        Assert.Equal(LogLevel.Warning, Assert.Single(broker.Log.Records).Level);
    }

    [Fact]
    public async Task Call_BrokerBugBecomesInternal_GuardSeesTheBrokersOwnLog()
    {
        // A clock that fails stands in for a bug: opening a session reads it, and the exception is no errno.
        var clock = new BrokenClock();
        var broker = await TestBroker.StartAsync(clock).WaitAsync(TestBroker.Timeout);
        clock.Broken = true;
        using (var call = broker.Client.Raw.Session.Open())
        {
            var e = await Assert.ThrowsAsync<RpcException>(() => call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));
            Assert.Equal(StatusCode.Internal, e.StatusCode);
        }
        clock.Broken = false;

        var failure = await Assert.ThrowsAsync<Xunit.Sdk.XunitException>(() => broker.DisposeAsync().AsTask().WaitAsync(TestBroker.Timeout));

        // Kestrel reads the clock too: its heartbeat may have failed as well while the clock was broken.
        Assert.Contains(broker.Log.UnexpectedErrors(), r => r.EventId.Id == BugEventId && r.Exception is BrokenClock.Failure);
        Assert.Contains(nameof(BrokenClock.Failure), failure.Message, StringComparison.Ordinal);
    }

    private static ILogger Logger(TestBroker broker) => broker.Services.GetRequiredService<ILogger<ErrorInterceptor>>();

    private static void LogBug(TestBroker broker, string message) => Logger(broker).LogError(new EventId(BugEventId), "{What}", message);

    private sealed class BrokenClock : TimeProvider
    {
        public volatile bool Broken;

        public override DateTimeOffset GetUtcNow() => Broken ? throw new Failure() : base.GetUtcNow();

        public sealed class Failure() : Exception("the clock is broken on purpose");
    }
}
